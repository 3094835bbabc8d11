"""Model files: one `.safetensors` file, tensors plus a JSON config in its metadata. No pickle.

The config records the format and its version, the model name and constructor parameters, the
fitted scalars (thresholds, training-set size) and the anomalens version. safetensors parses only
a JSON header and raw tensor bytes, so loading an untrusted file cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from anomalens.errors import AnomalensError, ModelFileError

FORMAT = "anomalens"
FORMAT_VERSION = 1
CONFIG_KEY = "anomalens_config"


def model_config(detector: Any) -> dict[str, Any]:
    """The JSON config of a fitted detector, as stored in its model file (and ONNX export)."""
    from anomalens import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "anomalens_version": __version__,
        "model": detector.name,
        "params": detector.get_params(),
        "fitted": detector.fitted_config(),
    }


def save_model(detector: Any, path: str | Path) -> Path:
    """Write a fitted detector to `path` (a `.safetensors` file)."""
    path = Path(path)
    config = model_config(detector)
    tensors = {key: t.detach().contiguous().cpu() for key, t in detector._tensors().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={CONFIG_KEY: json.dumps(config)})
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """The JSON config of a model file (or ONNX export), validated, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    if path.suffix.lower() == ".onnx":
        from anomalens.deploy.onnx_model import read_onnx_config

        return read_onnx_config(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise ModelFileError(
            f"{path} is not a readable anomalens model file (corrupt, truncated or not "
            f"safetensors): {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from error
    if CONFIG_KEY not in metadata:
        raise ModelFileError(f"{path} is a safetensors file but not an anomalens model")
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{path} has a corrupt model config: {error}") from error
    return check_config(config, path)


def check_config(config: Any, path: Path) -> dict[str, Any]:
    """`config` itself when it is a complete anomalens config of the supported format version."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not an anomalens model file")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model format version {version}; this anomalens reads version "
            f"{FORMAT_VERSION}"
        )
    for key in ("model", "params", "fitted"):
        if key not in config:
            raise ModelFileError(f"{path} has an incomplete model config: no {key!r}")
    return config


def load_model(path: str | Path) -> Any:
    """Load a detector saved with `save`, or an ONNX export (`.onnx`: an `OnnxModel`); raises
    `ModelFileError` for a bad file."""
    from anomalens.core.registry import create

    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from anomalens.deploy.onnx_model import OnnxModel

        return OnnxModel(path)
    config = read_config(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors: dict[str, torch.Tensor] = {
                key: handle.get_tensor(key)
                for key in handle.keys()  # noqa: SIM118 (safe_open is not a dict)
            }
    except Exception as error:
        raise ModelFileError(f"{path} is corrupt or truncated: {error}") from error
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
