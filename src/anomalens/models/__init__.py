"""Built-in detectors, one module per method; importing this package registers them."""

from anomalens.models import cflow, fastflow, patchcore
from anomalens.models.base import Detector

__all__ = ["Detector", "cflow", "fastflow", "patchcore"]
