"""ONNX Runtime vs torch: predict latency of one PatchCore on 2 cores at 256x256, batch 1 and 8.

    .venv/bin/python benchmarks/onnx_runtime.py [--data ../shared/datasets] [--json OUT.json]
        [--threads 2] [--model FITTED.safetensors (loaded if present, else fitted and saved)]

Fits PatchCore with its defaults (256 px, 1% coreset) on MVTec AD bottle (the synthetic brick
category where that is absent), exports it to ONNX, checks parity on the test images, then times
`predict` on uint8 256x256 images (decoding excluded, resizing and thresholds included) and the
bare graph (`predict_batch` on a ready tensor) for both runtimes, interleaved in one run, with
both limited to 2 threads; reported as medians (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

import anomalens
from anomalens.data.io import load_image
from anomalens.data.mvtec import test_samples, training_images
from anomalens.data.preprocessing import resize_to_tensor
from anomalens.data.synthetic import make_category
from anomalens.deploy.export import export_onnx

THREADS = 2


def dataset(data: Path, scratch: Path) -> Path:
    bottle = data / "mvtec_bottle_512"
    if bottle.is_dir():
        return bottle
    return make_category(
        scratch, "brick", n_train=60, n_test_good=8, n_test_defect=16, image_size=256
    )


def median_ms(runs: dict[str, list[float]]) -> dict[str, float]:
    return {name: 1000 * statistics.median(times) for name, times in runs.items()}


def timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def latency(torch_model, onnx_model, images: list[np.ndarray], batch: int, repeats: int) -> dict:
    """Median ms per call of predict and of the bare graph, both runtimes interleaved."""
    groups = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
    tensors = [resize_to_tensor(group, torch_model.image_size) for group in groups]
    runs: dict[str, list[float]] = {
        "torch_predict": [],
        "onnx_predict": [],
        "torch_graph": [],
        "onnx_graph": [],
    }
    for step in range(repeats + 2):
        group, tensor = groups[step % len(groups)], tensors[step % len(groups)]
        measured = {
            "torch_predict": timed(torch_model.predict, group),
            "onnx_predict": timed(onnx_model.predict, group),
            "torch_graph": timed(torch_model.predict_batch, tensor),
            "onnx_graph": timed(onnx_model.predict_batch, tensor),
        }
        if step >= 2:  # the first rounds warm up caches and thread pools
            for name, seconds in measured.items():
                runs[name].append(seconds)
    result = median_ms(runs)
    result["speedup_predict"] = result["torch_predict"] / result["onnx_predict"]
    result["speedup_graph"] = result["torch_graph"] / result["onnx_graph"]
    result["repeats"] = repeats
    return result


def parity(torch_model, onnx_model, images: list[np.ndarray]) -> dict:
    expected, got = torch_model.predict(images), onnx_model.predict(images)
    return {
        "images": len(images),
        "max_score_rel_error": max(
            abs(g.score - e.score) / abs(e.score) for e, g in zip(expected, got, strict=True)
        ),
        "max_map_abs_error": max(
            float(np.abs(g.anomaly_map - e.anomaly_map).max())
            for e, g in zip(expected, got, strict=True)
        ),
        "labels_equal": all(e.label == g.label for e, g in zip(expected, got, strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument(
        "--model", type=Path, default=None, help="fitted model file: used if present, else saved"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        root = dataset(args.data, Path(scratch))
        if args.model and args.model.is_file():
            model = anomalens.load(args.model)
        else:
            model = anomalens.create("patchcore").fit(training_images(root))
            if args.model:
                model.save(args.model)
        started = time.perf_counter()
        onnx_file = export_onnx(model, Path(scratch) / "model.onnx")
        export_s = time.perf_counter() - started
        onnx_model = anomalens.OnnxModel(onnx_file, threads=args.threads)
        paths = [sample.path for sample in test_samples(root)]
        size = model.image_size
        images = [
            (resize_to_tensor([load_image(p)], size)[0].permute(1, 2, 0) * 255)
            .round()
            .byte()
            .numpy()
            for p in paths[:32]
        ]
        report = {
            "data": str(root),
            "memory_bank": len(model.memory_bank_),
            "onnx_mb": onnx_file.stat().st_size / 1e6,
            "export_s": export_s,
            "threads": args.threads,
            "load_average": os.getloadavg(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "cpu": platform.processor() or platform.machine(),
            "parity": parity(model, onnx_model, [load_image(p) for p in paths]),
            "batch1": latency(model, onnx_model, images, 1, args.repeats),
            "batch8": latency(model, onnx_model, images, 8, max(8, args.repeats // 4)),
        }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
