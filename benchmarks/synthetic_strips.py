"""Thin cracks in long strips: PatchCore with `resize` squash, keep and auto (the default).

    .venv/bin/python benchmarks/synthetic_strips.py [--data ../shared/datasets] [--train 200]
        [--test 120] [--json OUT.json]

A line camera's strips (500 x 1260 px, like the commutator strips of issue 11, which the project
does not have) simulated from Magnetic Tile's normal training images: each is stretched to
500 x 1260. The first `--train` strips fit each model; of the next `--test`, every second one gets
a thin, low-contrast crack pasted at strip resolution: a polyline of 2-5 segments, 1-2.5 px wide,
+-0.04-0.08 of brightness (the parity harness's `thin_crack`, drawn on the strip). Reports image
AUROC, pixel AUROC and AUPRO, and the fit + predict seconds of each row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import anomalens
from anomalens.data.io import load_image
from anomalens.data.mvtec import training_images
from anomalens.evaluation.metrics import aupro, image_auroc, pixel_auroc

HEIGHT, WIDTH = 500, 1260
ROWS = {"squash": {"resize": "squash"}, "keep": {"resize": "keep"}, "auto (default)": {}}


def strip(path: Path) -> np.ndarray:
    """The image at `path` stretched to a HEIGHT x WIDTH uint8 RGB strip."""
    pixels = torch.from_numpy(load_image(path).copy()).permute(2, 0, 1)[None].float()
    stretched = F.interpolate(pixels, (HEIGHT, WIDTH), mode="bilinear", antialias=True)
    return stretched[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def thin_crack(rng: np.random.Generator) -> np.ndarray:
    """A random polyline crack's mask (HEIGHT x WIDTH), 1-2.5 px wide."""
    count = int(rng.integers(2, 6))
    angles = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.6, count))
    steps = rng.uniform(0.25, 0.5) * HEIGHT / count * np.stack([np.cos(angles), np.sin(angles)], 1)
    points = np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    low, high = 12 - points.min(0), np.array([WIDTH, HEIGHT]) - 12 - points.max(0)
    points += rng.uniform(low, np.maximum(low, high))
    grid = np.stack(np.mgrid[0:HEIGHT, 0:WIDTH][::-1], axis=-1).astype(np.float64)
    half, mask = rng.uniform(0.5, 1.25), np.zeros((HEIGHT, WIDTH), bool)
    for start, end in itertools.pairwise(points):
        along = np.clip(
            (grid - start) @ (end - start) / max((end - start) @ (end - start), 1e-9), 0, 1
        )
        nearest = start + along[..., None] * (end - start)
        mask |= np.linalg.norm(grid - nearest, axis=-1) <= half
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=120)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    paths = training_images(args.data / "magnetic_tile")
    train = [strip(path) for path in paths[: args.train]]
    rng = np.random.default_rng(0)
    tests, labels, masks = [], [], []
    for i, path in enumerate(paths[args.train : args.train + args.test]):
        image = strip(path).astype(np.float64) / 255
        mask = np.zeros((HEIGHT, WIDTH), bool)
        if i % 2:
            mask = thin_crack(rng)
            image[mask] += rng.choice([-1, 1]) * rng.uniform(0.04, 0.08)
        tests.append((image.clip(0, 1) * 255).round().astype(np.uint8))
        labels.append(i % 2)
        masks.append(mask)
    rows = []
    for name, params in ROWS.items():
        started = time.perf_counter()
        model = anomalens.create("patchcore", **params).fit(train)
        predictions = model.predict(tests)
        maps = [p.anomaly_map for p in predictions]
        row = {
            "resize": name,
            "resolved": model.input_mode,
            "image_auroc": image_auroc(np.array(labels), [p.score for p in predictions]),
            "pixel_auroc": pixel_auroc(masks, maps),
            "aupro": aupro(masks, maps),
            "seconds": time.perf_counter() - started,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
