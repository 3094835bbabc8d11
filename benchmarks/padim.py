"""PaDiM against PatchCore on the same backbone: predict time per image, interleaved.

    .venv/bin/python benchmarks/padim.py [--data ../shared/datasets] [--threads 1] [--json OUT]

Fits PaDiM and PatchCore (default settings, tf_efficientnet_lite0, 256x256) on MVTec bottle, then
times predict at batch 1 and at batch 8 for both, each call interleaved with the other model's
and with each model's own backbone forward in one loop (medians), so that both see the same load
on a shared machine. Accuracy, fit time and memory come from `anomalens benchmark`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import anomalens
from anomalens.data.mvtec import test_samples, training_images
from anomalens.evaluation.benchmark import interleaved_speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.data / "mvtec_bottle_512"
    models = {
        name: anomalens.create(name).fit(training_images(root)) for name in ("padim", "patchcore")
    }
    images = [s.path for s in test_samples(root)]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "torch_threads": torch.get_num_threads(),
        "batch_1": interleaved_speed(models, images, repeats=40, batch_size=1),
        "batch_8": interleaved_speed(models, images, repeats=10, batch_size=8),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
