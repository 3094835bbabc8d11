"""int8 vs fp32 ONNX graphs of one model (PatchCore unless --model), ONNX Runtime and OpenVINO.

    .venv/bin/python benchmarks/int8.py [--data ../shared/datasets] [--json OUT.json]
        [--threads 2] [--model FITTED.safetensors (loaded if present, else fitted and saved)]

Fits PatchCore with its defaults (256 px, 1% coreset) on MVTec AD bottle's train/good (the
synthetic brick category where that is absent), exports it as fp32 and as int8 (calibrated on
train/good, `anomalens export --int8`) and, the same way, its feature extractor alone. Reports:

- the int8 export's check and thresholds, and bottle accuracy of both graphs through
  `anomalens.evaluation.evaluate` (image AUROC, pixel AUROC, AUPRO, the fraction of test/good
  flagged), plus an int8 graph with every backbone node quantised (`float_below_stride=1`);
- the backbone features' relative error, int8 against fp32, for both;
- latency (median ms per call, all variants interleaved in one run, batch 1 and 8, 256x256) of the
  four graphs under ONNX Runtime and OpenVINO (fp32 inference precision; and OpenVINO's default,
  which on CPUs with AMX runs fp32 graphs in bf16), and the whole int8 graph and `predict` of the
  int8 model (uint8 images; resizing, thresholds and regions included) against the bare int8
  backbone, with ONNX Runtime's profile of the int8 graph (ms per operator type, batch 1).
OpenVINO is optional (`pip install openvino`); without it only ONNX Runtime is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from scipy.stats import spearmanr

import anomalens
from anomalens.data.io import load_image
from anomalens.data.mvtec import test_samples, training_images
from anomalens.data.preprocessing import iter_batches, resize_to_tensor
from anomalens.data.synthetic import make_category
from anomalens.deploy.export import INPUT_NAME, OPSET, export_onnx
from anomalens.deploy.int8 import CALIBRATION_IMAGES, export_int8, quantise_graph
from anomalens.errors import ExportError
from anomalens.evaluation.evaluator import evaluate

THREADS = 2


def dataset(data: Path, scratch: Path) -> Path:
    bottle = data / "mvtec_bottle_512"
    if bottle.is_dir():
        return bottle
    return make_category(
        scratch, "brick", n_train=60, n_test_good=8, n_test_defect=16, image_size=256
    )


class FeatureExtractor(torch.nn.Module):
    """The detector's backbone alone, under the name the int8 export quantises (`backbone`)."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.backbone(pixels))


def export_backbone(model, path: Path) -> Path:
    """The fitted model's feature extractor as an fp32 ONNX graph (dynamic batch)."""
    size = model.image_size
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            FeatureExtractor(model.backbone_).eval(),
            (torch.rand(2, 3, size, size),),
            input_names=[INPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            opset_version=OPSET,
            dynamo=True,
        )
    program.save(path, external_data=False)
    return path


def ort_session(path: Path, threads: int) -> Callable[[np.ndarray], list]:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda pixels: session.run(None, {INPUT_NAME: pixels})


def openvino_session(path: Path, threads: int, precision: str | None) -> Callable:
    import openvino

    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    request = openvino.Core().compile_model(str(path), "CPU", config).create_infer_request()
    return lambda pixels: list(request.infer({INPUT_NAME: pixels}).values())


def runtimes(graphs: dict[str, Path], threads: int) -> dict[str, Callable]:
    """One callable per (runtime, graph): pixels (B, 3, S, S) float32 -> outputs."""
    calls = {f"onnxruntime/{name}": ort_session(path, threads) for name, path in graphs.items()}
    try:
        import openvino  # noqa: F401
    except ImportError:
        return calls
    for name, path in graphs.items():
        calls[f"openvino_fp32/{name}"] = openvino_session(path, threads, "f32")
        calls[f"openvino_default/{name}"] = openvino_session(path, threads, None)
    return calls


def profile(path: Path, pixels: np.ndarray, threads: int, repeats: int = 10) -> dict[str, float]:
    """ONNX Runtime's profiler on one graph: ms per run by operator type, largest first."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(repeats):
        session.run(None, {INPUT_NAME: pixels})
    events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1000 / repeats
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def timed(function: Callable, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def latency(
    calls: dict[str, Callable], int8_model, images: list[np.ndarray], batch: int, repeats: int
) -> dict[str, float]:
    """Median ms per call of every graph under every runtime and of the int8 model's `predict`,
    interleaved; then the int8 graph's and predict's ratios to the bare int8 backbone under ONNX
    Runtime."""
    groups = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
    tensors = [resize_to_tensor(group, int8_model.image_size).numpy() for group in groups]
    runs: dict[str, list[float]] = {name: [] for name in [*calls, "int8_predict"]}
    for step in range(repeats + 2):
        group, pixels = groups[step % len(groups)], tensors[step % len(groups)]
        measured = {name: timed(call, pixels) for name, call in calls.items()}
        measured["int8_predict"] = timed(int8_model.predict, group)
        if step >= 2:  # the first rounds warm up caches and thread pools
            for name, seconds in measured.items():
                runs[name].append(seconds)
    result = {name: 1000 * statistics.median(times) for name, times in runs.items()}
    result["int8_graph_over_int8_backbone"] = (
        result["onnxruntime/full_int8"] / result["onnxruntime/backbone_int8"]
    )
    result["int8_predict_over_int8_backbone"] = (
        result["int8_predict"] / result["onnxruntime/backbone_int8"]
    )
    result["repeats"] = repeats
    return result


def feature_error(fp32: Callable, int8: Callable, pixels: np.ndarray) -> list[float]:
    """Relative error |int8 - fp32| / |fp32| of each feature map."""
    return [
        float(np.linalg.norm(q - f) / np.linalg.norm(f))
        for f, q in zip(fp32(pixels), int8(pixels), strict=True)
    ]


def accuracy(model, root: Path) -> dict:
    result = evaluate(model, root)
    good = [p.label for s, p in zip(result.samples, result.predictions, strict=True) if not s.label]
    return {
        "image_auroc": result.metrics["image_auroc"],
        "pixel_auroc": result.metrics["pixel_auroc"],
        "aupro": result.metrics["aupro"],
        "good_flagged": sum(good) / len(good),
        "image_threshold": model.image_threshold_,
        "pixel_threshold": model.pixel_threshold_,
        "scores": [p.score for p in result.predictions],
        "labels": [p.label for p in result.predictions],
    }


def agreement(reference: dict, other: dict) -> dict:
    return {
        "test_spearman": float(spearmanr(reference["scores"], other["scores"]).statistic),
        "test_identical_verdicts": float(np.mean(np.equal(reference["labels"], other["labels"]))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument(
        "--model", type=Path, default=None, help="fitted model file: used if present, else saved"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        root = dataset(args.data, scratch)
        train = training_images(root)
        if args.model and args.model.is_file():
            model = anomalens.load(args.model)
        else:
            model = anomalens.create("patchcore").fit(train)
            if args.model:
                model.save(args.model)
        graphs = {"full_fp32": export_onnx(model, scratch / "fp32.onnx")}
        started = time.perf_counter()
        graphs["full_int8"] = export_onnx(
            model, scratch / "int8.onnx", int8=True, calibration=train
        )
        int8_export_s = time.perf_counter() - started
        try:
            all_int8 = export_int8(
                model, graphs["full_fp32"], scratch / "all.onnx", train, float_below_stride=1
            )
        except ExportError as error:
            all_int8 = {"refused": str(error)}

        # the feature extractor alone, quantised the same way on the same calibration images
        order = np.random.default_rng(model.seed).permutation(len(train))
        calibration = [train[i] for i in sorted(order[: min(CALIBRATION_IMAGES, len(train) // 2)])]
        graphs["backbone_fp32"] = export_backbone(model, scratch / "backbone.onnx")
        quantised = {}
        for stride in (4, 1):
            quantised[stride] = scratch / f"backbone_int8_{stride}.onnx"
            batches = iter_batches(calibration, model.image_size, model.batch_size)
            quantise_graph(
                graphs["backbone_fp32"],
                quantised[stride],
                (b.pixels for b in batches),
                ["backbone"],
                model.image_size,
                float_below_stride=stride,
            )
        graphs["backbone_int8"] = quantised[4]
        held_out = [train[i] for i in sorted(order[-16:])]
        pixels = next(iter(iter_batches(held_out, model.image_size, 16))).pixels.numpy()
        fp32_backbone = ort_session(graphs["backbone_fp32"], args.threads)
        errors = {
            f"float_below_stride_{stride}": feature_error(
                fp32_backbone, ort_session(path, args.threads), pixels
            )
            for stride, path in quantised.items()
        }

        fp32_model = anomalens.OnnxModel(graphs["full_fp32"], threads=args.threads)
        int8_model = anomalens.OnnxModel(graphs["full_int8"], threads=args.threads)
        metrics = {"fp32": accuracy(fp32_model, root), "int8": accuracy(int8_model, root)}
        if "refused" not in all_int8:
            all_model = anomalens.OnnxModel(scratch / "all.onnx", threads=args.threads)
            metrics["int8_all_backbone"] = accuracy(all_model, root)
        for name in list(metrics)[1:]:
            metrics[name].update(agreement(metrics["fp32"], metrics[name]))
        for values in metrics.values():
            del values["scores"], values["labels"]

        calls = runtimes(graphs, args.threads)
        size = model.image_size
        images = [
            (resize_to_tensor([load_image(s.path)], size)[0].permute(1, 2, 0) * 255)
            .round()
            .byte()
            .numpy()
            for s in test_samples(root)[:32]
        ]
        reference = calls["onnxruntime/full_fp32"](pixels[:4])[0]
        parity = {
            name: float(np.max(np.abs(call(pixels[:4])[0] - reference)))
            for name, call in calls.items()
            if name.endswith("/full_fp32")
        }
        report = {
            "data": str(root),
            "model": model.name,
            "memory_bank": len(model.memory_bank_) if hasattr(model, "memory_bank_") else None,
            "threads": args.threads,
            "load_average": os.getloadavg(),
            "onnxruntime": onnxruntime.__version__,
            "openvino": _openvino_version(),
            "torch": torch.__version__,
            "cpu": cpu_name(),
            "sizes_mb": {name: path.stat().st_size / 1e6 for name, path in graphs.items()},
            "int8_export_s": int8_export_s,
            "int8_export": int8_model.config["int8"],
            "int8_all_backbone_export": all_int8,
            "feature_relative_error": errors,
            "accuracy": metrics,
            "fp32_score_max_abs_difference_from_onnxruntime": parity,
            "int8_graph_profile_batch1_ms": profile(graphs["full_int8"], pixels[:1], args.threads),
            "batch1": latency(calls, int8_model, images, 1, args.repeats),
            "batch8": latency(calls, int8_model, images, 8, max(8, args.repeats // 3)),
        }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")


def _openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


if __name__ == "__main__":
    main()
