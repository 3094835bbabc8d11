"""Built-in detectors, one module per method; importing this package registers them."""

from anomalens.models import (
    autoencoder,
    dfr,
    fanogan,
    gaussian,
    knn,
    padim,
    patchcore,
    tiled,
    vae,
)
from anomalens.models.base import Detector

__all__ = [
    "Detector",
    "autoencoder",
    "dfr",
    "fanogan",
    "gaussian",
    "knn",
    "padim",
    "patchcore",
    "tiled",
    "vae",
]
