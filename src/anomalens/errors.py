"""Exceptions raised for user mistakes: each carries one clear, single-line message."""


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
