"""Model files: one `.safetensors` file, tensors plus a JSON config in its metadata. No pickle.

The config records the format and its version, the model name and constructor parameters, the
fitted scalars (thresholds, training-set size) and the anomalens version. safetensors parses only
a JSON header and raw tensor bytes, so loading an untrusted file cannot run code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from anomalens._version import __version__
from anomalens.errors import ModelFileError

FORMAT = "anomalens"
FORMAT_VERSION = 1
CONFIG_KEY = "anomalens_config"
ONNX_NOT_OURS = "an ONNX file but not an anomalens export"


def model_config(name: str, params: dict[str, Any], fitted: dict[str, Any]) -> dict[str, Any]:
    """The JSON config of a fitted model, as stored in its model file (and ONNX export)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "anomalens_version": __version__,
        "model": name,
        "params": params,
        "fitted": fitted,
    }


def write_model_file(
    path: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> Path:
    """Write tensors and a config (`model_config`) to `path` (a `.safetensors` file)."""
    path = Path(path)
    tensors = {key: t.detach().contiguous().cpu() for key, t in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={CONFIG_KEY: json.dumps(config)})
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """The JSON config of a model file (or ONNX export), validated, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    if path.suffix.lower() == ".onnx":
        return read_onnx_config(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise ModelFileError(
            f"{path} is not a readable anomalens model file (corrupt, truncated or not "
            f"safetensors): {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from error
    return parse_config(metadata, path, "a safetensors file but not an anomalens model")


def read_onnx_config(path: str | Path) -> dict[str, Any]:
    """The anomalens config stored in an exported ONNX file's metadata, validated."""
    import onnx  # heavy, and needed only for ONNX files: imported on first use

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise ModelFileError(f"{path} is not a readable ONNX file: {first_line(error)}") from error
    metadata = {p.key: p.value for p in model.metadata_props}
    return parse_config(metadata, path, ONNX_NOT_OURS)


def parse_config(metadata: Mapping[str, str], path: Path, not_ours: str) -> dict[str, Any]:
    """The config stored as JSON in a file's `metadata`, validated (`not_ours`: what the file
    is when it has none)."""
    if CONFIG_KEY not in metadata:
        raise ModelFileError(f"{path} is {not_ours}")
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{path} has a corrupt model config: {error}") from error
    return check_config(config, path)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the validated config of a `.safetensors` model file."""
    path = Path(path)
    config = read_config(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors: dict[str, torch.Tensor] = {
                key: handle.get_tensor(key)
                for key in handle.keys()  # noqa: SIM118 (safe_open is not a dict)
            }
    except Exception as error:
        raise ModelFileError(f"{path} is corrupt or truncated: {error}") from error
    return tensors, config
