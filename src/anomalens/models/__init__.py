"""Built-in detectors, one module per method; importing this package registers them."""

from anomalens.core.detector import Detector
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
