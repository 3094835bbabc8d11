"""anomalens: unsupervised visual anomaly detection.

import anomalens
model = anomalens.create("patchcore")
model.fit(normal_images)
predictions = model.predict(images)
model.save("model.safetensors"); model = anomalens.load("model.safetensors")
"""

from anomalens.errors import AnomalensError
from anomalens.model_io import load_model as load
from anomalens.prediction import Prediction
from anomalens.registry import create, list_models

__version__ = "0.1.0"

__all__ = ["AnomalensError", "Prediction", "__version__", "create", "list_models", "load"]
