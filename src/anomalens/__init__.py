"""anomalens: unsupervised visual anomaly detection.

import anomalens
model = anomalens.create("patchcore")
model.fit(normal_images)
predictions = model.predict(images)
model.save("model.safetensors"); model = anomalens.load("model.safetensors")
onnx_model = anomalens.OnnxModel("model.onnx")  # after `anomalens export`: ONNX Runtime
"""

from typing import Any

from anomalens.errors import AnomalensError
from anomalens.model_io import load_model as load
from anomalens.prediction import Prediction
from anomalens.registry import create, list_models

__version__ = "0.1.0"

__all__ = [
    "AnomalensError",
    "OnnxModel",
    "Prediction",
    "__version__",
    "create",
    "list_models",
    "load",
]


def __getattr__(name: str) -> Any:
    if name == "OnnxModel":  # imported on first use: onnxruntime is only needed for it
        from anomalens.runtime import OnnxModel

        return OnnxModel
    raise AttributeError(f"module 'anomalens' has no attribute {name!r}")
