"""PatchCore on two or more backbones, interleaved: the cost of a `fit --auto` candidate and speed.

    .venv/bin/python benchmarks/backbones.py [--backbones tf_efficientnet_lite0,mobilenetv2_100]
        [--data ../shared/datasets/magnetic_tile] [--threads 1] [--json OUT]

Per backbone, `--repeats` times in turn: fit PatchCore (default settings) on 40 training images
and predict 48 test images, the sizes of one `fit --auto` candidate; then batch-1 predict and
backbone forward, every call interleaved (medians), so all backbones see the same load on a
shared machine. The CPU seconds give `selection._BACKBONE_COST`. Accuracy comes from
`anomalens benchmark --param backbone=NAME`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import anomalens
from anomalens.data.mvtec import test_samples, training_images
from anomalens.evaluation.benchmark import interleaved_speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="tf_efficientnet_lite0,mobilenetv2_100")
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/magnetic_tile"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train = training_images(args.data)[::19][:40]
    test = [s.path for s in test_samples(args.data)][::12][:48]
    names = args.backbones.split(",")
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    models = {}
    for _ in range(args.repeats):
        for name in names:
            wall, cpu = time.perf_counter(), time.process_time()
            models[name] = anomalens.create("patchcore", backbone=name).fit(train)
            models[name].predict(test)
            runs[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "torch_threads": torch.get_num_threads(),
        "fit_predict": {
            name: {
                "wall_s": statistics.median(w for w, _ in runs[name]),
                "cpu_s": statistics.median(c for _, c in runs[name]),
            }
            for name in names
        },
        "batch1": interleaved_speed(models, test[:30], 30, 1),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
