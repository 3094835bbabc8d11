"""The model registry: `create(name, **params)` and `list_models()`, like timm's."""

from __future__ import annotations

from typing import Any, TypeVar

from anomalens.errors import AnomalensError, ParameterError

_MODELS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(cls: T) -> T:
    """Class decorator: make a detector available under its `name`."""
    _MODELS[cls.name] = cls
    return cls


def model_class(name: str) -> type:
    import anomalens.models  # noqa: F401  (registers the built-in detectors)

    try:
        return _MODELS[name]
    except KeyError:
        raise AnomalensError(
            f"unknown model {name!r}; available: {', '.join(sorted(_MODELS))}"
        ) from None


def create(name: str, **params: Any) -> Any:
    """A new, unfitted detector: `create("patchcore", coreset_ratio=0.01)`."""
    cls = model_class(name)
    unknown = sorted(set(params) - set(cls.param_names()))
    if unknown:
        raise ParameterError(
            f"{name} has no parameter {unknown[0]!r}; "
            f"its parameters: {', '.join(cls.param_names())}"
        )
    return cls(**params)


def list_models() -> list[str]:
    """Names of every registered detector."""
    import anomalens.models  # noqa: F401

    return sorted(_MODELS)
