"""PatchCore's compressed bank (`bank_index`): accuracy and predict time of the `pq` and `ivfpq`
searches against the exact one, on the same fitted bank.

    .venv/bin/python benchmarks/bank_index.py [--data ../shared/datasets] [--json OUT.json]
        [--datasets mvtec_bottle_512 magnetic_tile] [--ratios 0.01 0.1] [--every 1]
        [--threads 1]

For each dataset and `coreset_ratio`: fit PatchCore once (exact, `bank_index="flat"`) on
`train/good` (every `--every`-th image), then evaluate the whole test split with
`anomalens.evaluation.evaluate` under each search, switching only `bank_index` (the bank, the
support and the thresholds stay those of the exact fit). Prints image AUROC, pixel AUROC, AUPRO,
predict ms per image and the index build time, and each compressed search minus the exact one
against the issue's bars (image and pixel AUROC within 0.005).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import anomalens
from anomalens.data.mvtec import training_images
from anomalens.evaluation import evaluate

BARS = {"image_auroc": 0.005, "pixel_auroc": 0.005}
KEYS = ("image_auroc", "pixel_auroc", "aupro", "predict_ms_per_image")
SEARCHES = ("flat", "pq", "ivfpq")


def measure(root: Path, ratio: float, every: int) -> list[dict]:
    """One exact fit of `root`, evaluated under each search."""
    images = training_images(root)[::every]
    model = anomalens.create("patchcore", coreset_ratio=ratio, bank_index="flat")
    started = time.perf_counter()
    model.fit(images)
    fit_s = time.perf_counter() - started
    rows = []
    for search in SEARCHES:
        started = time.perf_counter()
        model.set_params(bank_index=search)
        model._compressed_index()  # build it here, outside the predict time
        build_s = time.perf_counter() - started
        metrics = evaluate(model, root).metrics
        row = {"dataset": root.name, "n_train": len(images), "every": every}
        row.update(coreset_ratio=ratio, bank=len(model.memory_bank_), fit_s=round(fit_s, 1))
        row.update(search=search, index_build_s=round(build_s, 2), rerank=model.rerank)
        row.update({key: metrics[key] for key in KEYS})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--datasets", nargs="+", default=["mvtec_bottle_512", "magnetic_tile"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.01, 0.1])
    parser.add_argument("--every", type=int, default=1, help="use every n-th training image")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    __import__("faiss").omp_set_num_threads(args.threads)
    rows = []
    for dataset in args.datasets:
        for ratio in args.ratios:
            rows.extend(measure(args.data / dataset, ratio, args.every))
    print("\n| dataset | ratio | bank | search | image AUROC | pixel AUROC | AUPRO | ms/img |")
    print("|---|---|---|---|---|---|---|---|")
    exact: dict = {}
    for row in rows:
        key = (row["dataset"], row["coreset_ratio"])
        exact.setdefault(key, row)
        cells = [f"{row[k]:.4f}" for k in KEYS[:3]]
        if row["search"] != "flat":
            cells = [
                f"{c} ({row[k] - exact[key][k]:+.4f})" for c, k in zip(cells, KEYS, strict=False)
            ]
        print(
            f"| {row['dataset']} | {row['coreset_ratio']} | {row['bank']:,} | {row['search']} | "
            f"{' | '.join(cells)} | {row['predict_ms_per_image']:.1f} |"
        )
    within = all(
        abs(row[k] - exact[(row["dataset"], row["coreset_ratio"])][k]) <= bar
        for row in rows
        for k, bar in BARS.items()
    )
    print(f"\nevery compressed search within the bars: {within}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
