"""Built-in detectors, one module per method; importing this package registers them."""

from anomalens.models import gaussian, knn, padim, patchcore, tiled
from anomalens.models.base import Detector

__all__ = ["Detector", "gaussian", "knn", "padim", "patchcore", "tiled"]
