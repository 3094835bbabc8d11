"""Normalizing-flow detectors (FastFlow, CFlow) on the real datasets: accuracy, fit time, memory
and predict speed.

    .venv/bin/python benchmarks/flows.py [--data ../shared/datasets] [--models fastflow cflow]
        [--tile-every 2] [--json OUT.json]

Default settings (lite0 backbone, 256 px). MVTec AD bottle with all training images; Magnetic
Tile fitted on every `--tile-every`-th training image (by name) to keep the run short on a shared
CPU, tested on its whole test split. Speed: predict on one 256x256 image against the backbone's
own forward pass on it, interleaved in the same run, medians (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from anomalens.data.io import load_image
from anomalens.data.mvtec import test_samples
from anomalens.data.preprocessing import resize_to_tensor
from anomalens.evaluation import fit_and_evaluate
from anomalens.evaluation.benchmark import run_info


def speed(model, root: Path, repeats: int = 20) -> dict:
    """Median ms of predict_batch on one 256x256 image vs the backbone forward on it."""
    paths = [s.path for s in test_samples(root)][: repeats + 3]
    tensors = [resize_to_tensor([load_image(p)], model.image_size) for p in paths]
    predict_ms, backbone_ms = [], []
    with torch.inference_mode():
        for index, tensor in enumerate(tensors):
            started = time.perf_counter()
            model.backbone_(tensor)
            middle = time.perf_counter()
            model.predict_batch(tensor)
            ended = time.perf_counter()
            if index >= 3:
                backbone_ms.append(1000 * (middle - started))
                predict_ms.append(1000 * (ended - middle))
    predict, backbone = statistics.median(predict_ms), statistics.median(backbone_ms)
    return {
        "predict_ms_batch1": predict,
        "backbone_ms_batch1": backbone,
        "ratio": predict / backbone,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--models", nargs="+", default=["fastflow", "cflow"])
    parser.add_argument("--tile-every", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    report: dict = {
        **run_info(),
    }
    datasets = [("mvtec_bottle_512", 1), ("magnetic_tile", args.tile_every)]
    for model_name in args.models:
        for name, every in datasets:
            load_before = os.getloadavg()[0]
            cpu_before = time.process_time()
            model, evaluation = fit_and_evaluate(model_name, args.data / name, train_every=every)
            metrics = evaluation.metrics
            metrics["cpu_s_fit_and_evaluate"] = time.process_time() - cpu_before
            metrics["load_average"] = [load_before, os.getloadavg()[0]]
            training = model.training_[model.name]
            metrics["epochs"] = training["epochs"]
            metrics["stopped"] = training["stopped"]
            metrics["training_s"] = training["seconds"]
            metrics.update(speed(model, args.data / name))
            report[f"{name}/{model_name}"] = metrics
            print(json.dumps({f"{name}/{model_name}": metrics}, indent=2), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
