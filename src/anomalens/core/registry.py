"""The model registry: `create(name, **params)`, `list_models()` and `load_model(path)`, like
timm's. A leaf of the detector layer: each method registers itself with `@register` when its
module is imported (`anomalens.models` imports them all; `import anomalens` does that)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from anomalens.core.detector import Detector
from anomalens.core.model_file import read_model_file
from anomalens.errors import AnomalensError, ModelFileError

_MODELS: dict[str, type[Detector]] = {}
T = TypeVar("T", bound=type[Detector])


def register(cls: T) -> T:
    """Class decorator: make a detector available under its `name`."""
    _MODELS[cls.name] = cls
    return cls


def model_class(name: str) -> type[Detector]:
    try:
        return _MODELS[name]
    except KeyError:
        raise AnomalensError(
            f"unknown model {name!r}; available: {', '.join(sorted(_MODELS))}"
        ) from None


def create(name: str, **params: Any) -> Detector:
    """A new, unfitted detector: `create("patchcore", coreset_ratio=0.01)`."""
    cls = model_class(name)
    cls.check_params(params)
    return cls(**params)


def list_models() -> list[str]:
    """Names of every registered detector."""
    return sorted(_MODELS)


def load_model(path: str | Path) -> Detector:
    """Load a detector saved with `save`; raises `ModelFileError` for a bad file."""
    tensors, config = read_model_file(path)
    try:
        detector = create(config["model"], **config["params"])
        detector.restore(tensors, config["fitted"])
    except ModelFileError:
        raise
    except (AnomalensError, KeyError, RuntimeError, TypeError, ValueError) as error:
        raise ModelFileError(
            f"{path} does not hold a valid {config['model']} model: {error}"
        ) from error
    return detector
