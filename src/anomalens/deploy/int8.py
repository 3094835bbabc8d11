"""int8 ONNX graphs: `anomalens export MODEL --format onnx --int8 --calibration FOLDER`.

The float graph from `export_onnx` is quantised statically with ONNX Runtime's tools
(`onnxruntime.quantization.quantize_static`): QDQ format, int8 weights per output channel,
uint8 activations whose ranges (MinMax) come from normal images. Only the feature extractor is
int8: the nodes of the detector's networks (`ScoreGraph`'s submodules, found through the
exporter's name scopes), except those that read a map of stride below `FLOAT_BELOW_STRIDE` (the
stem and first stage of a CNN, where rounding is amplified most: quantising them too raised the
EfficientNet-Lite0 features' relative error on MVTec bottle from 6-7% to 14-19% and cost PatchCore
0.008 AUPRO; benchmarks/RESULTS.md). Distances, reductions and the smoothing of the maps stay
float.

The memory-bank search (PatchCore's |v|^2 - 2 q.v over every bank patch, as large a product as the
backbone's convolutions) becomes an int8 matrix product (`quantise_search`; `int8_search=False`
keeps it float): each bank patch and each query patch is scaled by its own largest component to
[-127, 127], so a patch's rounding depends on that patch alone, never on the batch or on
calibration ranges that an anomalous patch could exceed. The squared norms, the query's included,
stay float, and the distance is to the rounded bank patch.

A model file does not hold its training images, so the normal images come with the export
(`--calibration`, e.g. the training folder). A seeded part of them (`CALIBRATION_IMAGES` at
most) calibrates the activations; the rest (`CHECK_IMAGES` at most) are held out for the
thresholds and the check:

- thresholds: each float threshold is carried to the int8 value of the same rank (quantile
  matching) among the scores of the held-out images and their synthetic-defect copies, or among
  the held-out images' map pixels: quantisation barely reorders scores, so the int8 graph keeps
  the float model's calibrated verdicts. Re-estimating them outright would set them too low when
  these are training images, which a model scores lower than new normal images (bottle,
  PatchCore: 20.9 against fit's 24.5); moving them by the shift of one quantile of the normal
  images only left PaDiM on bottle 94.6% identical verdicts (benchmarks/RESULTS.md);
- check: the held-out images and a synthetic-defect copy of each (`synthetic_anomalies`) are
  scored by the float model and by the int8 graph. The export is refused (`ExportError`) unless
  Spearman's rank correlation of the defect copies' image scores is at least `MIN_SPEARMAN` and at
  least `MIN_VERDICT_AGREEMENT` of all these images get the same verdict. Normal images' scores
  lie in a narrow band that rounding reorders without changing a verdict (bottle: rho 0.42 over
  them alone), so the order that must survive is the defects'.

For a method that centres features on a fitted mean (PaDiM), the rounding error of the int8
features is then measured on the same normal images (int8 minus float, per patch position) and
absorbed into the graph's statistics (`absorb_rounding`): the Gaussian's mean moves by the error's
mean and its covariance widens by the error's, so that the Mahalanobis distance does not read
rounding as anomaly (bottle AUPRO -0.012 without it, benchmarks/RESULTS.md).

The thresholds, the settings and the check are stored in the ONNX metadata (`int8` in the
config; `threshold_source` is `int8_calibration`).
"""

from __future__ import annotations

import ast
import json
import logging
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from scipy.stats import spearmanr

from anomalens.components.density import Moments
from anomalens.core.detector import Detector, readable_images
from anomalens.core.model_file import CONFIG_KEY
from anomalens.data.augment import synthetic_anomalies
from anomalens.data.io import stretch_mask
from anomalens.data.preprocessing import Batch, ImageLike, iter_batches
from anomalens.deploy.onnx_model import OnnxModel
from anomalens.errors import ExportError

CALIBRATION_IMAGES = 32
"""Images that set the activation ranges, at most: ONNX Runtime's calibrator keeps every
calibrated tensor of every image in memory (32 images of 256 px for EfficientNet-Lite0: ~2 GB)."""
CHECK_IMAGES = 200
"""Held-out images for the thresholds and the check, at most."""
MIN_IMAGES = 4
FLOAT_BELOW_STRIDE = 4
"""Network nodes reading a map of a smaller stride (the input and stride-2 maps) stay float."""
MIN_SPEARMAN = 0.95
"""Least Spearman rank correlation of the float and int8 scores of the synthetic defects (bottle,
PatchCore: 0.999; the tests' synthetic brick texture at 128 px: 0.976-0.986)."""
MIN_VERDICT_AGREEMENT = 0.95
"""Least fraction of the check images with the same verdict from the float and int8 models."""
SEARCH_LEVELS = 127
"""The int8 search scales each patch to integers in [-SEARCH_LEVELS, SEARCH_LEVELS]."""
CONTRIB_DOMAIN = "com.microsoft"
"""ONNX Runtime's operators (the int8 search's `MatMulIntegerToFloat`)."""
THRESHOLD_SOURCE = "int8_calibration"
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
"""Node metadata of torch's ONNX exporter: the module path of the code that made the node."""


def calibration_images(images: Sequence[ImageLike] | None) -> list[ImageLike]:
    """The readable ones of the normal images given for an int8 export (at least `MIN_IMAGES`)."""
    readable, _ = readable_images(images or [])
    if len(readable) < MIN_IMAGES:
        raise ExportError(
            f"an int8 export needs at least {MIN_IMAGES} readable normal images to calibrate "
            f"on (e.g. the training folder), got {len(readable)}"
        )
    return readable


def export_int8(
    detector: Detector,
    float_path: Path,
    path: Path,
    images: Sequence[ImageLike],
    float_below_stride: int = FLOAT_BELOW_STRIDE,
    int8_search: bool = True,
) -> dict[str, Any]:
    """Quantise the float graph of `detector` at `float_path` into `path`, calibrated on the normal
    `images`, its bank search too unless `int8_search` is False, with thresholds moved and checked
    as the module says; returns the `int8` record stored in its metadata. Raises `ExportError`
    (nothing written) when the check fails."""
    order = np.random.default_rng(detector.seed).permutation(len(images))
    count = min(CALIBRATION_IMAGES, len(images) // 2)
    activation = [images[i] for i in sorted(order[:count])]
    held_out = [images[i] for i in sorted(order[count : count + CHECK_IMAGES])]
    networks = [name for name, _ in detector.export_module().named_children()]
    with tempfile.TemporaryDirectory() as scratch:
        quantised = Path(scratch) / "int8.onnx"
        size, batch_size, mode = detector.image_size, detector.batch_size, detector.input_mode
        batches = iter_batches(activation, size, batch_size, "int8 calibration", mode)
        nodes = quantise_graph(
            float_path, quantised, (b.pixels for b in batches), networks, size, float_below_stride
        )
        searches = 0
        if int8_search:
            graph = onnx.load(str(quantised))
            searches = quantise_search(graph)
            onnx.save(graph, str(quantised))
        feature_error = absorb_rounding(detector, quantised, [*activation, *held_out])
        int8 = OnnxModel(quantised)
        thresholds, agreement = _compare(detector, int8, held_out)
        record = {
            "format": "QDQ, int8 weights per channel, uint8 activations (MinMax)",
            "quantised_nodes": len(nodes),
            "float_below_stride": float_below_stride,
            "search": "int8, a scale per patch" if searches else "float",
            "calibration_images": len(activation),
            "check_images": len(held_out),
            "absorbed_feature_error": feature_error,
            "float_thresholds": {
                "image_threshold": detector.image_threshold_,
                "pixel_threshold": detector.pixel_threshold_,
            },
            "agreement": agreement,
            "tolerance": {"spearman": MIN_SPEARMAN, "verdicts": MIN_VERDICT_AGREEMENT},
        }
        if agreement["spearman"] < MIN_SPEARMAN or agreement["verdicts"] < MIN_VERDICT_AGREEMENT:
            raise ExportError(
                f"the int8 graph of {detector.name} does not agree with the float model on "
                f"{len(held_out)} held-out normal images and their synthetic defects: Spearman "
                f"{agreement['spearman']:.3f} (needs >= {MIN_SPEARMAN}), identical verdicts "
                f"{agreement['verdicts']:.1%} (needs >= {MIN_VERDICT_AGREEMENT:.0%}); not written"
            )
        config = detector.model_config()
        config["fitted"].update(thresholds, threshold_source=THRESHOLD_SOURCE)
        config["int8"] = record
        graph = onnx.load(str(quantised))
    metadata = {entry.key: entry.value for entry in graph.metadata_props}
    metadata[CONFIG_KEY] = json.dumps(config)
    onnx.helper.set_model_props(graph, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(path))
    return record


def quantise_graph(
    float_path: Path,
    path: Path,
    calibration: Iterable[torch.Tensor],
    networks: Sequence[str],
    image_size: int,
    float_below_stride: int = FLOAT_BELOW_STRIDE,
) -> list[str]:
    """Write the QDQ int8 version of the float graph at `float_path` to `path`: the nodes of the
    modules `networks` that read maps of stride `float_below_stride` or more are quantised,
    with activation ranges from the pixel batches `calibration`. Returns those nodes' names."""
    from onnxruntime.quantization import (  # heavy, and only needed here: imported on first use
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    graph = onnx.load(str(float_path))
    nodes = feature_nodes(graph, networks, image_size, float_below_stride)
    if not nodes:
        raise ExportError(f"{float_path} has no feature-extractor layers to quantise")
    input_name = graph.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self, batches: Iterator[torch.Tensor]) -> None:
            self.batches = batches

        def get_next(self) -> dict[str, np.ndarray] | None:
            pixels = next(self.batches, None)
            return None if pixels is None else {input_name: pixels.numpy()}

    # It advises pre-processing (shape inference, graph rewrites) on the root logger: these
    # graphs carry their shapes, and rewrites would lose the name scopes the nodes come from.
    logging.disable(logging.WARNING)
    try:
        quantize_static(
            graph,
            str(path),
            Reader(iter(calibration)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
        )
    finally:
        logging.disable(logging.NOTSET)
    return nodes


def quantise_search(graph: onnx.ModelProto) -> int:
    """Rewrite in place each exact bank search of `graph` (a `Gemm` |v|^2 - 2 q.v over a constant
    bank, read only by a `ReduceMin`: `components.neighbors.nearest_distances`) as an int8 matrix
    product, as the module says; returns how many were rewritten (0 for a graph without one)."""
    body = graph.graph
    tensors = {tensor.name: tensor for tensor in body.initializer}
    made_by = {output: node for node in body.node for output in node.output}
    readers: dict[str, list[str]] = defaultdict(list)
    for node in body.node:
        for name in node.input:
            readers[name].append(node.op_type)
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in body.node:
        bank = _searched_bank(node, tensors, made_by, readers)
        if bank is None:
            nodes.append(node)
            continue
        new_nodes, constants = _int8_search(
            node.input[0], node.output[0], bank, f"int8_search_{rewritten}"
        )
        nodes.extend(new_nodes)
        body.initializer.extend(constants)
        rewritten += 1
    if rewritten:
        del body.node[:]
        body.node.extend(nodes)
        if all(entry.domain != CONTRIB_DOMAIN for entry in graph.opset_import):
            graph.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return rewritten


def _searched_bank(
    node: onnx.NodeProto,
    tensors: dict[str, onnx.TensorProto],
    made_by: dict[str, onnx.NodeProto],
    readers: dict[str, list[str]],
) -> np.ndarray | None:
    """The bank (N, D) that `node` searches, if it is a bank search as `quantise_search` says."""
    if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in tensors:
        return None
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("alpha") != -2.0 or attributes.get("beta", 1.0) != 1.0:
        return None
    if attributes.get("transA", 0) or set(readers[node.output[0]]) != {"ReduceMin"}:
        return None
    weights = node.input[1]
    transposed = bool(attributes.get("transB", 0))
    source = made_by.get(weights)
    if weights not in tensors and source is not None and source.op_type == "Transpose":
        perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), [1, 0])
        if perm != [1, 0] or source.input[0] not in tensors:
            return None
        weights, transposed = source.input[0], not transposed
    if weights not in tensors:
        return None
    matrix = onnx.numpy_helper.to_array(tensors[weights]).astype(np.float32)
    return matrix if transposed else matrix.T


def _int8_search(
    queries: str, output: str, bank: np.ndarray, prefix: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing `output` = |v'|^2 - 2 q.v' for every query row and rounded bank patch v'
    from an int8 product, each side scaled per patch; and their constants."""
    peaks = np.maximum(np.abs(bank).max(axis=1), np.finfo(np.float32).tiny)
    codes = np.round(bank * (SEARCH_LEVELS / peaks[:, None])).astype(np.int8)
    rounded = codes.astype(np.float32) * (peaks[:, None] / SEARCH_LEVELS)
    constants = {
        "codes": np.ascontiguousarray(codes.T),
        "columns": (-2.0 * peaks / SEARCH_LEVELS).astype(np.float32),
        "norms": (rounded * rounded).sum(axis=1).astype(np.float32),
        "axis": np.array([1], dtype=np.int64),
        "tiny": np.array(np.finfo(np.float32).tiny, dtype=np.float32),
        "step": np.array(1.0 / SEARCH_LEVELS, dtype=np.float32),
        "zero": np.array(128, dtype=np.uint8),
    }
    name = {
        key: f"{prefix}_{key}" for key in [*constants, "abs", "peak", "row", "unit", "q", "scaled"]
    }
    make = onnx.helper.make_node
    nodes = [
        make("Abs", [queries], [name["abs"]]),
        make("ReduceMax", [name["abs"], name["axis"]], [name["peak"]], keepdims=1),
        make("Max", [name["peak"], name["tiny"]], [name["row"]]),
        make("Div", [queries, name["row"]], [name["unit"]]),
        make("QuantizeLinear", [name["unit"], name["step"], name["zero"]], [name["q"]]),
        make(  # ONNX Runtime's fused int8 product, cast and column scales (contrib operator)
            "MatMulIntegerToFloat",
            [name["q"], name["codes"], name["step"], name["columns"], name["zero"]],
            [name["scaled"]],
            domain=CONTRIB_DOMAIN,
        ),
        make("Mul", [name["scaled"], name["row"]], [f"{prefix}_product"]),
        make("Add", [f"{prefix}_product", name["norms"]], [output]),
    ]
    for step, node in enumerate(nodes):
        node.name = f"{prefix}_{step}_{node.op_type}"
    tensors = [onnx.numpy_helper.from_array(v, name[k]) for k, v in constants.items()]
    return nodes, tensors


def absorb_rounding(
    detector: Detector, path: Path, images: Sequence[ImageLike]
) -> dict[str, float] | None:
    """For a detector with a `feature_mean` (PaDiM), measure the int8 graph at `path`'s rounding
    error on its features (int8 minus float, per position, on the normal `images`) and rewrite
    the graph's statistics to absorb it (`Detector.absorb_feature_error`); returns the error's
    size relative to the features, or None for other detectors (graph unchanged)."""
    if detector.feature_mean is None:
        return None
    import onnxruntime  # heavy, and only needed here: imported on first use

    graph = onnx.load(str(path))
    tensors = {entry.name: entry for entry in graph.graph.initializer}
    mean_name = _initializer_of(tensors, getattr(detector, detector.feature_mean))
    centring = next(node for node in graph.graph.node if mean_name in node.input)
    features = next(name for name in centring.input if name != mean_name)
    probe = onnx.ModelProto()
    probe.CopyFrom(graph)
    probe.graph.output.append(
        onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None)
    )
    session = onnxruntime.InferenceSession(
        probe.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    error, error_norm, feature_norm = None, 0.0, 0.0
    batches = iter_batches(
        images, detector.image_size, detector.batch_size, "int8 rounding", detector.input_mode
    )
    with torch.inference_mode():
        for batch in batches:
            exact = detector.feature_vectors(batch.pixels)
            rounded = session.run([features], {session.get_inputs()[0].name: batch.pixels.numpy()})
            difference = (torch.from_numpy(rounded[0]) - exact).transpose(0, 1).contiguous()
            if error is None:
                error = Moments.start(difference)
            error.add(difference)
            error_norm += float(difference.square().sum())
            feature_norm += float(exact.square().sum())
    assert error is not None  # at least MIN_IMAGES images
    for name, value in detector.absorb_feature_error(error).items():
        entry = tensors[_initializer_of(tensors, getattr(detector, name))]
        entry.CopyFrom(onnx.numpy_helper.from_array(value.numpy(), entry.name))
    onnx.save(graph, str(path))
    return {"images": len(images), "relative_error": (error_norm / feature_norm) ** 0.5}


def _initializer_of(tensors: dict[str, onnx.TensorProto], value: torch.Tensor) -> str:
    """The name of the graph constant equal to the fitted tensor `value` (the exporter lifts
    fitted tensors into constants of its own names)."""
    expected = value.numpy()
    for name, tensor in tensors.items():
        if tuple(tensor.dims) == expected.shape and np.array_equal(
            onnx.numpy_helper.to_array(tensor), expected
        ):
            return name
    raise ExportError(f"the ONNX graph has no constant of shape {expected.shape} to update")


def feature_nodes(
    graph: onnx.ModelProto,
    networks: Sequence[str],
    image_size: int,
    float_below_stride: int = FLOAT_BELOW_STRIDE,
) -> list[str]:
    """Names of the nodes made by the modules `networks` (top-level submodules of the exported
    module) whose first input, for a `image_size` square image, is not a map of stride below
    `float_below_stride`."""
    heights = _input_heights(graph, image_size)
    names = []
    for node in graph.graph.node:
        scopes = next((e.value for e in node.metadata_props if e.key == NAME_SCOPES), "[]")
        path = ast.literal_eval(scopes)
        if len(path) < 2 or path[1] not in networks:
            continue
        height = heights.get(node.input[0]) if node.input else None
        if height is None or height * float_below_stride <= image_size:
            names.append(node.name)
    return names


def _input_heights(graph: onnx.ModelProto, image_size: int) -> dict[str, int]:
    """Height of every 4-d tensor of `graph` for one `image_size` square input."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(graph)
    for dim, value in zip(
        fixed.graph.input[0].type.tensor_type.shape.dim, (1, 3, image_size, image_size), strict=True
    ):
        dim.dim_value = value
    inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    heights = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[2].HasField("dim_value"):
            heights[value.name] = dims[2].dim_value
    return heights


def _compare(
    detector: Detector, int8: OnnxModel, images: list[ImageLike]
) -> tuple[dict[str, float | None], dict[str, float]]:
    """The thresholds of `int8` and its agreement with `detector` (Spearman of the defects' scores,
    fraction of identical verdicts) on `images` (held-out normal images) and a synthetic-defect
    copy of each."""
    generator = torch.Generator().manual_seed(detector.seed)
    scores: dict[str, list[np.ndarray]] = {"float": [], "int8": []}
    defects: dict[str, list[np.ndarray]] = {"float": [], "int8": []}
    pixels: dict[str, list[np.ndarray]] = {"float": [], "int8": []}
    batches = iter_batches(
        images, detector.image_size, detector.batch_size, "int8 check", detector.input_mode
    )
    for batch in batches:
        copies, _, _ = synthetic_anomalies(list(batch.pixels), generator)
        copy_batch = Batch(torch.stack(copies), batch.sizes, batch.boxes)
        for key, model in (("float", detector), ("int8", int8)):
            batch_scores, maps = model.score_prepared(batch)
            scores[key].append(batch_scores)
            defects[key].append(model.score_prepared(copy_batch)[0])
            if detector.produces_maps:
                # With a region of interest, the pixels inside it only, as `fit` counts them.
                roi = detector.roi_
                pixels[key].extend(
                    (m if roi is None else m[stretch_mask(roi, m.shape)]).ravel() for m in maps
                )
    normal = {key: np.concatenate(value) for key, value in scores.items()}
    defect = {key: np.concatenate(value) for key, value in defects.items()}
    both = {key: np.concatenate([normal[key], defect[key]]) for key in normal}
    image_threshold = _same_rank(detector.image_threshold_, both)
    pixel_threshold = None
    if detector.produces_maps:
        flat = {key: np.concatenate(value) for key, value in pixels.items()}
        pixel_threshold = _same_rank(detector.pixel_threshold_, flat)
    verdicts = np.concatenate(
        [
            (normal["float"] > detector.image_threshold_) == (normal["int8"] > image_threshold),
            (defect["float"] > detector.image_threshold_) == (defect["int8"] > image_threshold),
        ]
    )
    rho = float(np.nan_to_num(spearmanr(defect["float"], defect["int8"]).statistic))
    thresholds = {
        "image_threshold": float(image_threshold),
        "pixel_threshold": None if pixel_threshold is None else float(pixel_threshold),
    }
    return thresholds, {"spearman": rho, "verdicts": float(verdicts.mean())}


def _same_rank(threshold: float, values: dict[str, np.ndarray]) -> float:
    """The int8 value at the rank `threshold` has among the float `values` of the same inputs
    (a quantile-quantile map); beyond their range, shifted as the nearest end."""
    source, target = np.sort(values["float"]), np.sort(values["int8"])
    if threshold <= source[0]:
        return float(threshold + target[0] - source[0])
    if threshold >= source[-1]:
        return float(threshold + target[-1] - source[-1])
    return float(np.interp(threshold, source, target))
