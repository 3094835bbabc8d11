"""Built-in detectors, one module per method; importing this package registers them."""

from anomalens.models import (
    autoencoder,
    cflow,
    dfr,
    fanogan,
    fastflow,
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
    "cflow",
    "dfr",
    "fanogan",
    "fastflow",
    "gaussian",
    "knn",
    "padim",
    "patchcore",
    "tiled",
    "vae",
]
