"""PatchCore on the real datasets: accuracy, fit time, peak memory and predict speed.

    .venv/bin/python benchmarks/patchcore.py [--data ../shared/datasets] [--json OUT.json]
        [--bottle-only]

Accuracy and fit time/RSS on MVTec AD bottle and magnetic tile (default settings, lite0); then
the speed bar: predict on 256x256 images at batch 1 against the backbone's own forward pass,
interleaved in the same run and reported as medians of many repetitions (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import anomalens
from anomalens.data.mvtec import test_samples, training_images
from anomalens.evaluation import evaluate
from anomalens.evaluation.benchmark import batch1_speed, run_info
from anomalens.evaluation.memory import peak_rss_mb


def accuracy(root: Path, params: dict) -> dict:
    model = anomalens.create("patchcore", **params)
    started = time.perf_counter()
    model.fit(training_images(root))
    fit_s = time.perf_counter() - started
    fit_rss = peak_rss_mb()
    metrics = evaluate(model, root).metrics
    metrics.update(fit_s=fit_s, peak_rss_mb_after_fit=fit_rss, memory_bank=len(model.memory_bank_))
    return {"model": model, "metrics": metrics}


def speed(model, root: Path, repeats: int = 40) -> dict:
    """Median ms of predict([256x256 uint8 image]) vs backbone forward on the same tensor."""
    return batch1_speed(model, [s.path for s in test_samples(root)], repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--bottle-only", action="store_true", help="skip magnetic tile (bottle and the speed bar)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    report: dict = {
        **run_info(),
    }
    bottle = accuracy(args.data / "mvtec_bottle_512", {})
    report["bottle"] = bottle["metrics"]
    report["bottle_speed"] = speed(bottle["model"], args.data / "mvtec_bottle_512")
    print(json.dumps({k: report[k] for k in ("bottle", "bottle_speed")}, indent=2), flush=True)
    if not args.bottle_only:
        report["magnetic_tile"] = accuracy(args.data / "magnetic_tile", {})["metrics"]
        print(json.dumps(report["magnetic_tile"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
