"""ONNX Runtime inference for models exported with `anomalens export`.

`OnnxModel(path)` has the torch model's `predict`, `decision_function` and `predict_batch`: it is a
`Detector` whose batch scoring runs the ONNX graph, so image loading, resizing, thresholds and
masks are the very same code. It reads everything it needs (thresholds, input size, model name and
parameters) from the ONNX metadata. It cannot be fitted or saved: fit the torch model and export it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from anomalens.errors import AnomalensError, ExportError, ModelFileError
from anomalens.model_io import CONFIG_KEY, check_config
from anomalens.models.base import Detector
from anomalens.preprocessing import ImageLike


def read_onnx_config(path: str | Path) -> dict[str, Any]:
    """The anomalens config stored in an exported ONNX file's metadata, validated."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise ModelFileError(f"{path} is not a readable ONNX file: {_first_line(error)}") from error
    return _config(({p.key: p.value for p in model.metadata_props}), path)


def _config(metadata: Mapping[str, str], path: Path) -> dict[str, Any]:
    if CONFIG_KEY not in metadata:
        raise ModelFileError(f"{path} is an ONNX file but not an anomalens export")
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{path} has a corrupt model config: {error}") from error
    return check_config(config, path)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class OnnxModel(Detector):
    """An exported model run by ONNX Runtime on the CPU; `threads` = ORT's intra-op threads
    (None: ORT's default, one per physical core)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"model file not found: {path}")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: spinning wins little on an idle machine, and on
        # a busy one (a service's other threads, other processes) it made calls ~50x slower.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:
            raise ModelFileError(
                f"{path} is not a readable ONNX model: {_first_line(error)}"
            ) from error
        config = _config(session.get_modelmeta().custom_metadata_map, path)
        common = set(Detector.param_names())
        super().__init__(**{k: v for k, v in config["params"].items() if k in common})
        self.path = path
        self.threads = threads
        self.config = config
        self.name = config["model"]
        self.resize = config["params"].get("resize", "squash")
        self.session_ = session
        self.input_name_ = session.get_inputs()[0].name
        self.produces_maps = len(session.get_outputs()) > 1
        self.restore({}, config["fitted"])

    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.session_.run(None, {self.input_name_: pixels.numpy()})
        return outputs[0], outputs[1] if self.produces_maps else None

    def _restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Nothing to rebuild: the graph holds the fitted tensors."""

    def fit(self, images: Sequence[ImageLike]) -> Self:
        raise AnomalensError(
            f"{self.path} is an ONNX export and cannot be fitted; fit the torch model "
            "(anomalens fit) and export it again"
        )

    def save(self, path: str | Path) -> Path:
        raise AnomalensError(
            f"{self.path} is an ONNX export; it is already saved (copy the file to keep it)"
        )

    def export_module(self) -> torch.nn.Module:
        raise ExportError(f"{self.path} is already an ONNX export; export the .safetensors model")
