"""Exceptions raised for user mistakes, each with one clear, single-line message, and the
parameter checks that raise them."""

from typing import Any


class AnomalensError(Exception):
    """Base class for every error anomalens raises on bad input (the CLI exits with status 2)."""


class ImageReadError(AnomalensError, ValueError):
    """An image file (or in-memory image) cannot be read or converted."""


class DataError(AnomalensError, ValueError):
    """A dataset folder is missing, empty or not in a layout anomalens understands."""


class ModelFileError(AnomalensError, ValueError):
    """A model file is missing, corrupt, truncated, foreign or of an unsupported version."""


class WeightsError(AnomalensError, RuntimeError):
    """Pretrained backbone weights cannot be found; the message says how to supply them."""


class NotFittedError(AnomalensError, RuntimeError):
    """A detector was used before `fit` (or `load`)."""


class ExportError(AnomalensError, ValueError):
    """A model cannot be exported (its method has no exportable graph) or the export failed."""


class ParameterError(AnomalensError, ValueError):
    """A detector parameter has a value outside what it accepts."""


def check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a `ParameterError` naming `field` unless `value` is one of `choices`."""
    if value not in choices:
        raise ParameterError(f"{field} must be one of {', '.join(choices)}; got {value!r}")


def check_positive(field: str, value: float) -> None:
    if not value > 0:
        raise ParameterError(f"{field} must be positive, got {value!r}")
