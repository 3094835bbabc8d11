"""anomalens: unsupervised visual anomaly detection.

import anomalens
model = anomalens.create("patchcore")
model.fit(normal_images)
predictions = model.predict(images)
model.save("model.safetensors"); model = anomalens.load("model.safetensors")
onnx_model = anomalens.OnnxModel("model.onnx")  # after `anomalens export`: ONNX Runtime
"""

from pathlib import Path

from anomalens import models  # noqa: F401  (importing the models registers them)
from anomalens._version import __version__
from anomalens.core.detector import Detector
from anomalens.core.prediction import Prediction
from anomalens.core.registry import create, list_models, load_model
from anomalens.deploy.onnx_model import OnnxModel
from anomalens.errors import AnomalensError

__all__ = [
    "AnomalensError",
    "OnnxModel",
    "Prediction",
    "__version__",
    "create",
    "list_models",
    "load",
]


def load(path: str | Path, threads: int | None = None) -> Detector | OnnxModel:
    """Load a model file written by `save` (`.safetensors`), or an ONNX export (`.onnx`: an
    `OnnxModel` computing on `threads` ONNX Runtime threads; None: one per core); raises
    `ModelFileError` for a bad file."""
    if Path(path).suffix.lower() == ".onnx":
        return OnnxModel(path, threads)
    return load_model(path)
