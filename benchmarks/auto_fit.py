"""`fit --auto` on an MVTec-layout dataset: its choice, its time, and whether its synthetic-anomaly
score ranks the candidates as their real test AUROC does.

    python benchmarks/auto_fit.py ../shared/datasets/mvtec_bottle_512 [--time-budget 600]
        [--train-every N] [--threads T] [--json OUT]

1. Runs `auto_fit` on the training images (every N-th with `--train-every`) within the time
   budget, as `anomalens fit --auto` does, and times it (the 10-minute bar).
2. Afterwards, for the report only, fits every candidate that the search scored on the same
   training images and evaluates it on the real test split (the winner's refit is reused); the
   test labels never reach the search.
3. Prints the Spearman rank correlation across candidates between the synthetic score (and its
   image / pixel parts) and the real image AUROC (and pixel AUROC), and the chosen candidate's
   real metrics against the default PatchCore's (`anomalens fit` without options).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

import anomalens
from anomalens.data.mvtec import training_images
from anomalens.evaluation import evaluate
from anomalens.evaluation.selection import auto_fit

REAL = ("image_auroc", "pixel_auroc", "aupro")


def _spearman(xs: list[float | None], ys: list[float | None]) -> float | None:
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None and y is not None]
    if len(pairs) < 3:
        return None
    rho = spearmanr([x for x, _ in pairs], [y for _, y in pairs]).statistic
    return None if rho != rho else round(float(rho), 3)  # nan when one side is constant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="MVTec-layout category folder")
    parser.add_argument("--time-budget", type=float, default=600.0)
    parser.add_argument("--train-every", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = training_images(args.data)[:: args.train_every]

    started = time.perf_counter()
    chosen, rows = auto_fit(images, time_budget_s=args.time_budget, seed=0)
    auto_s = time.perf_counter() - started
    print(f"auto_fit: {chosen.selection_['chosen']} in {auto_s:.0f} s", flush=True)

    for row in rows:
        if row["score"] is None:
            continue
        detector = chosen if row["chosen"] else anomalens.create(row["model"], **row["params"])
        if not row["chosen"]:
            detector.fit(images)
        metrics = evaluate(detector, args.data).metrics
        row.update({f"real_{key}": metrics[key] for key in REAL})
        print(
            f"{row['candidate']:40s} synthetic {row['score']:.3f} "
            f"real image AUROC {metrics['image_auroc']:.4f}",
            flush=True,
        )
    scored = [row for row in rows if row["score"] is not None]
    default = next(
        (
            r
            for r in scored
            if r["model"] == "patchcore" and r["candidate"] == "patchcore lite0 256"
        ),
        None,
    )
    if default is None:
        detector = anomalens.create("patchcore").fit(images)
        default = {f"real_{k}": v for k, v in evaluate(detector, args.data).metrics.items()}
    winner = next(row for row in rows if row["chosen"])
    correlations: dict[str, Any] = {}
    for synthetic in ("score", "synthetic_image_auroc", "synthetic_pixel_auroc"):
        for real in ("real_image_auroc", "real_pixel_auroc"):
            correlations[f"{synthetic} vs {real}"] = _spearman(
                [r[synthetic] for r in scored], [r[real] for r in scored]
            )
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "data": str(args.data),
        "n_train": len(images),
        "time_budget_s": args.time_budget,
        "auto_fit_s": round(auto_s, 1),
        "torch_threads": torch.get_num_threads(),
        "chosen": winner["candidate"],
        "chosen_real": {k: winner.get(f"real_{k}") for k in REAL},
        "default_real": {k: default.get(f"real_{k}") for k in REAL},
        "spearman": correlations,
        "candidates": rows,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "candidates"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
