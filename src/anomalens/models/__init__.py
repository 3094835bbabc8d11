"""Built-in detectors, one module per method; importing this package registers them."""

from anomalens.models import deepsvdd, ocsvm, patchcore, rotnet
from anomalens.models.base import Detector

__all__ = ["Detector", "deepsvdd", "ocsvm", "patchcore", "rotnet"]
