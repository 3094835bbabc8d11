"""ONNX export: a fitted detector as one ONNX graph from pixels to image scores and anomaly maps.

    anomalens export model.safetensors --format onnx -o model.onnx

The graph's input `pixels` is (B, 3, S, S) float32 RGB in [0, 1]: the image resized to the
model's input size S as `anomalens.data.preprocessing.resize_to_tensor` does (bilinear,
antialiased); the backbone's normalisation is inside the graph. Its outputs are `score` (B,)
and, for methods with maps, `anomaly_map` (B, S, S). The batch size is free. Each method supplies
its graph through `Detector.export_module()`; methods without one raise `ExportError`.

The model's config (name, parameters, thresholds, training-set size, format version) and the
preprocessing settings travel in the ONNX metadata, so `anomalens.OnnxModel(path)` predicts
like the torch model with no other file. Every export is run once under ONNX Runtime and checked
against the torch model before it is kept. With `int8`, the checked float graph is then quantised
(`anomalens.deploy.int8`), calibrated and checked on normal `calibration` images.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalens.core.detector import Detector
from anomalens.core.model_file import CONFIG_KEY
from anomalens.data.preprocessing import KEEP_MULTIPLE, LETTERBOX_FILL, ImageLike
from anomalens.deploy.int8 import calibration_images, export_int8
from anomalens.deploy.onnx_model import OnnxModel
from anomalens.errors import ExportError
from anomalens.features.handcrafted import HandcraftedFeatures

FORMATS = ("onnx",)
OPSET = 18
INPUT_NAME = "pixels"
PREPROCESSING_KEY = "anomalens_preprocessing"


RESIZE_TEXT = {
    "squash": "bilinear, antialiased, to size x size (aspect ratio not kept)",
    "keep": f"bilinear, antialiased, short side to size, both sides rounded to a multiple of "
    f"{KEEP_MULTIPLE} (aspect ratio kept; the graph takes any such height and width)",
    "letterbox": f"bilinear, antialiased, long side to size, centred on a size x size square "
    f"filled with {LETTERBOX_FILL}",
}


def preprocessing_config(image_size: int, resize: str = "squash") -> dict[str, Any]:
    """What a caller must do to an image before the graph (stored in the ONNX metadata)."""
    return {
        "input": INPUT_NAME,
        "layout": "NCHW",
        "dtype": "float32",
        "channels": "RGB",
        "range": [0.0, 1.0],
        "size": [image_size, image_size],
        "resize_mode": resize,
        "resize": RESIZE_TEXT[resize],
        "normalisation": "inside the graph",
    }


def export_onnx(
    detector: Detector,
    path: str | Path,
    opset: int = OPSET,
    *,
    int8: bool = False,
    calibration: Sequence[ImageLike] | None = None,
    int8_search: bool = True,
) -> Path:
    """Write a fitted detector as one ONNX file (weights inside) and check it against torch; with
    `int8`, quantise it with the normal `calibration` images (e.g. its training images), its
    memory-bank search too unless `int8_search` is False, and check it against the float model
    (`anomalens.deploy.int8.export_int8`)."""
    if isinstance(detector, OnnxModel):
        raise ExportError(
            f"{detector.path} is already an ONNX export; export the .safetensors model"
        )
    detector._check_fitted()
    path = Path(path)
    if not int8:
        if calibration is not None or not int8_search:
            raise ExportError(
                "calibration images and int8_search are only used by an int8 export (int8=True)"
            )
        return _export_float(detector, path, opset)
    images = calibration_images(calibration)
    with tempfile.TemporaryDirectory() as scratch:
        float_path = _export_float(detector, Path(scratch) / "float.onnx", opset)
        export_int8(detector, float_path, path, images, int8_search=int8_search)
    return path


def _export_float(detector: Detector, path: Path, opset: int) -> Path:
    """The float graph of `detector` at `path`, checked against torch."""
    module = detector.export_module().eval()
    if any(isinstance(part, HandcraftedFeatures) for part in module.modules()):
        raise ExportError(
            f"{detector.name} with backbone='handcrafted' cannot be exported to ONNX: its features "
            "are computed by scikit-image, outside torch; use a CNN backbone"
        )
    size = detector.image_size
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    outputs = ["score", "anomaly_map"] if detector.produces_maps else ["score"]
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)}
    if detector.input_mode == "keep":
        # Any height and width that are multiples of KEEP_MULTIPLE, as `keep` resizes to.
        dims[2] = KEEP_MULTIPLE * torch.export.Dim("height_blocks", min=1, max=256)
        dims[3] = KEEP_MULTIPLE * torch.export.Dim("width_blocks", min=1, max=256)
    with torch.inference_mode():
        module(example)  # one eager pass builds the constants the graph takes over (`axis_matrix`)
    try:
        # The exporter reports its steps on stdout and warns about internals: keep both quiet.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                input_names=[INPUT_NAME],
                output_names=outputs,
                dynamic_shapes=(dims,),
                opset_version=opset,
                dynamo=True,
            )
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"exporting {detector.name} to ONNX failed: {first}") from error
    metadata = program.model.metadata_props
    metadata[CONFIG_KEY] = json.dumps(detector.model_config())
    metadata[PREPROCESSING_KEY] = json.dumps(preprocessing_config(size, detector.input_mode))
    program.model.doc_string = (
        f"anomalens {detector.name}: {INPUT_NAME} (B, 3, {size}, {size}) RGB in [0, 1] -> "
        + ", ".join(outputs)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path, external_data=False)
    try:
        _check_against_torch(detector, path, example)
    except ExportError:
        path.unlink(missing_ok=True)
        raise
    return path


def _check_against_torch(detector: Detector, path: Path, pixels: torch.Tensor) -> None:
    """Raise `ExportError` unless ONNX Runtime reproduces the torch model on `pixels` (the model
    the graph computes: `Detector.exported_model`)."""
    scores, maps = detector.exported_model().predict_batch(pixels)
    onnx_scores, onnx_maps = OnnxModel(path).predict_batch(pixels)
    score_error = float(np.max(np.abs(onnx_scores - scores) / np.maximum(np.abs(scores), 1e-6)))
    map_error = 0.0 if maps is None else float(np.max(np.abs(onnx_maps - maps)))
    map_scale = 1.0 if maps is None else max(1.0, float(np.abs(maps).max()))
    if score_error > 1e-3 or map_error > 1e-3 * map_scale:
        raise ExportError(
            f"the ONNX graph of {detector.name} does not reproduce the torch model (score "
            f"relative error {score_error:.2g}, map error {map_error:.2g}); not written"
        )
