"""anomalens: unsupervised visual anomaly detection.

import anomalens
model = anomalens.create("patchcore")
model.fit(normal_images)
predictions = model.predict(images)
model.save("model.safetensors"); model = anomalens.load("model.safetensors")
onnx_model = anomalens.OnnxModel("model.onnx")  # after `anomalens export`: ONNX Runtime
"""

from typing import Any

from anomalens.core.model_file import load_model as load
from anomalens.core.prediction import Prediction
from anomalens.core.registry import create, list_models
from anomalens.errors import AnomalensError

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
        from anomalens.deploy.onnx_model import OnnxModel

        return OnnxModel
    raise AttributeError(f"module 'anomalens' has no attribute {name!r}")
