"""Built-in detectors, one module per method; importing this package registers them."""

from anomalens.models import (
    autoencoder,
    cflow,
    cutpaste,
    deepsvdd,
    dfr,
    fanogan,
    fastflow,
    gaussian,
    knn,
    ocsvm,
    padim,
    patchcore,
    rotnet,
    tiled,
    vae,
)
from anomalens.models.base import Detector

__all__ = [
    "Detector",
    "autoencoder",
    "cflow",
    "cutpaste",
    "deepsvdd",
    "dfr",
    "fanogan",
    "fastflow",
    "gaussian",
    "knn",
    "ocsvm",
    "padim",
    "patchcore",
    "rotnet",
    "tiled",
    "vae",
]
