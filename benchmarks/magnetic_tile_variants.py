"""PatchCore variants on magnetic tile: image AUROC per defect type for three image scores.

    PYTHONPATH=src .venv/bin/python benchmarks/magnetic_tile_variants.py [PARAMS_JSON]
        [--train-every N] [--flips] [--data ../shared/datasets/magnetic_tile]

Fits PatchCore with PARAMS_JSON (e.g. '{"layers": ["blocks.4", "blocks.6"]}', default '{}') on
every Nth training image, predicts the whole test split and reports, for the model's own image
score, the maximum of its smoothed map and the mean of the map's top 1% pixels: image AUROC over
all defects and per defect type (each against all normal test images), and pixel AUROC. With
`--flips` it also scores the test images flipped horizontally, vertically and both, and reports
the average of the four (test-time augmentation). A development tool: what it measures on the
test split informs the report, never a default.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import anomalens
from anomalens.data.mvtec import load_sample_mask, test_samples, training_images
from anomalens.evaluation.metrics import image_auroc, pixel_auroc

FLIPS = {
    "none": lambda a: a,
    "horizontal": lambda a: a[:, ::-1],
    "vertical": lambda a: a[::-1],
    "both": lambda a: a[::-1, ::-1],
}


def top_fraction_mean(values: np.ndarray, fraction: float = 0.01) -> float:
    ordered = np.sort(values.ravel())
    return float(ordered[-max(1, int(len(ordered) * fraction)) :].mean())


def report(samples, scores_by_kind: dict, maps: list[np.ndarray]) -> dict:
    labels = np.array([s.label for s in samples])
    defects = sorted({s.defect for s in samples} - {"good"})
    result: dict = {}
    for kind, scores in scores_by_kind.items():
        scores = np.asarray(scores)
        row = {"all": round(image_auroc(labels, scores), 4)}
        for defect in defects:
            chosen = np.array([s.defect in (defect, "good") for s in samples])
            row[defect] = round(image_auroc(labels[chosen], scores[chosen]), 4)
        result[kind] = row
    masks = [load_sample_mask(s, m.shape) for s, m in zip(samples, maps, strict=True)]
    result["pixel_auroc"] = round(pixel_auroc(masks, maps), 4)
    return result


def image_scores(scores: list[float], maps: list[np.ndarray]) -> dict:
    return {
        "model score": scores,
        "map max": [m.max() for m in maps],
        "map top 1% mean": [top_fraction_mean(m) for m in maps],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", nargs="?", default="{}")
    parser.add_argument("--train-every", type=int, default=1)
    parser.add_argument("--flips", action="store_true")
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/magnetic_tile"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    params = json.loads(args.params)
    started = time.perf_counter()
    model = anomalens.create("patchcore", **params).fit(
        training_images(args.data)[:: args.train_every]
    )
    out: dict = {"params": params, "train_every": args.train_every}
    out["fit_s"] = round(time.perf_counter() - started, 1)
    out["bank"] = len(model.memory_bank_)
    samples = test_samples(args.data)
    if not args.flips:
        predictions = model.predict([s.path for s in samples])
        maps = [p.anomaly_map for p in predictions]
        out["plain"] = report(samples, image_scores([p.score for p in predictions], maps), maps)
    else:
        images = [np.asarray(Image.open(s.path).convert("RGB")) for s in samples]
        flipped = {}
        for name, flip in FLIPS.items():
            predictions = model.predict([np.ascontiguousarray(flip(a)) for a in images])
            flipped[name] = (
                [p.score for p in predictions],
                [flip(p.anomaly_map) for p in predictions],
            )
        scores, maps = flipped["none"]
        out["plain"] = report(samples, image_scores(scores, maps), maps)
        mean_scores = np.mean([s for s, _ in flipped.values()], axis=0)
        mean_maps = [
            np.mean([m[i] for _, m in flipped.values()], axis=0) for i in range(len(images))
        ]
        out["four flips averaged"] = report(
            samples, image_scores(mean_scores, mean_maps), mean_maps
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
