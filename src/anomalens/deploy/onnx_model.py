"""ONNX Runtime inference for models exported with `anomalens export`.

`OnnxModel(path)` has the torch model's `predict`, `decision_function`, `predict_batch` and
`calibrate`: it is a `Scorer`, as every `Detector` is, whose batch scoring runs the ONNX graph, so
image loading, resizing, thresholds and masks are the very same code. It reads everything it needs
(thresholds, input size, model name and parameters) from the ONNX metadata. Learning is the torch
model's: fit it and export it again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from anomalens.core.model_file import ONNX_NOT_OURS, first_line, parse_config
from anomalens.core.scorer import Scorer
from anomalens.errors import ModelFileError


class OnnxModel(Scorer):
    """An exported model run by ONNX Runtime on the CPU; `threads` = ORT's intra-op threads
    (None: ORT's default, one per physical core)."""

    torch_threads = 1
    """ONNX Runtime computes on its own threads; torch only resizes (`Scorer.torch_threads`)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime  # heavy, and only needed for ONNX models: imported on first use

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
                f"{path} is not a readable ONNX model: {first_line(error)}"
            ) from error
        config = parse_config(session.get_modelmeta().custom_metadata_map, path, ONNX_NOT_OURS)
        self.path = path
        self.threads = threads
        self.config = config
        self.name = config["model"]
        # what `resize` resolved to at fit (`auto`), else the parameter (older files)
        self.resize = config["fitted"].get("resize") or config["params"].get("resize", "squash")
        self.produces_maps = len(session.get_outputs()) > 1
        self.image_size = int(config["params"]["image_size"])
        self.batch_size = int(config["params"]["batch_size"])
        self.session_ = session
        self.input_name_ = session.get_inputs()[0].name
        self.restore_thresholds(config["fitted"])

    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.session_.run(None, {self.input_name_: pixels.numpy()})
        return outputs[0], outputs[1] if self.produces_maps else None
