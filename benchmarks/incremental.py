"""Incremental updates and the bounded-memory PatchCore coreset (issue: partial_fit).

    .venv/bin/python benchmarks/incremental.py [--parts updates bounded memory]
        [--datasets mvtec_bottle_512 magnetic_tile] [--images 1000 5000] [--shard-images 100]
        [--json benchmarks/out/incremental.json]

(a) `updates`: default PatchCore and PaDiM fitted once on all of train/good vs fitted on its first
    half and updated (`partial_fit`) with the second half; image AUROC, pixel AUROC and AUPRO
    (`anomalens.evaluation.evaluate`). Bar: within 0.005 image and pixel AUROC.
(b) `bounded`: default PatchCore, exact coreset (one shard) vs the bounded one (shards of
    `--shard-images`, 50 here so that bottle's 209 images make 5 shards). Bar: within 0.005.
(c) `memory`: peak RSS (VmHWM) and time of the bounded PatchCore fit on N synthetic 256 px normal
    texture crops (`anomalens.data.synthetic`), written as PNG files first so that the images are
    never all in memory; each N in its own process. Bar: under 4 GB at 20,000 images. One run
    on images written before: `--memory-run N --image-folder DIR [--shard-images 100]`.
Datasets are read from ../shared/datasets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import anomalens
from anomalens.data.mvtec import training_images
from anomalens.data.synthetic import TEXTURES, normal_crop
from anomalens.evaluation.evaluator import evaluate
from anomalens.evaluation.memory import PeakMemory

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
KEYS = ("image_auroc", "pixel_auroc", "aupro")


def metrics(model: anomalens.Detector, root: Path, fit_s: float) -> dict[str, float]:
    found = evaluate(model, root).metrics
    return {key: round(found[key], 4) for key in KEYS} | {"fit_s": round(fit_s, 1)}


def updates(root: Path) -> list[dict]:
    images = training_images(root)
    half = len(images) // 2
    rows = []
    for name in ("patchcore", "padim"):
        started = time.perf_counter()
        once = anomalens.create(name).fit(images)
        once_s = time.perf_counter() - started
        started = time.perf_counter()
        updated = anomalens.create(name).fit(images[:half]).partial_fit(images[half:])
        updated_s = time.perf_counter() - started
        rows.append({"model": name, "how": "one fit", **metrics(once, root, once_s)})
        rows.append(
            {"model": name, "how": "fit half + partial_fit half"}
            | metrics(updated, root, updated_s)
        )
        print(json.dumps(rows[-2:]), flush=True)
    return rows


def bounded(root: Path, shard_images: int) -> list[dict]:
    images = training_images(root)
    rows = []
    for shards in (len(images), shard_images):
        started = time.perf_counter()
        model = anomalens.create("patchcore", shard_images=shards).fit(images)
        fit_s = time.perf_counter() - started
        how = "exact" if shards >= len(images) else f"bounded, shards of {shards}"
        rows.append({"how": how, "bank": len(model.memory_bank_), **metrics(model, root, fit_s)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def memory_run(count: int, shard_images: int, folder: Path | None = None) -> dict:
    """One bounded fit on `count` synthetic images in this process (run by `memory`), written
    as PNG files to a temporary folder, or the first `count` PNG files of `folder`."""
    with tempfile.TemporaryDirectory() as temporary:
        if folder is None:
            rng = np.random.default_rng(0)
            paths = []
            for i in range(count):
                path = Path(temporary) / f"{i:05d}.png"
                Image.fromarray(normal_crop(TEXTURES[i % 3], rng, 256)).save(path, compress_level=1)
                paths.append(path)
        else:
            paths = sorted(folder.glob("*.png"))[:count]
        model = anomalens.create("patchcore", shard_images=shard_images)
        with PeakMemory() as memory:
            started = time.perf_counter()
            model.fit(paths)
            fit_s = time.perf_counter() - started
    return {
        "images": len(paths),
        "shard_images": shard_images,
        "fit_s": round(fit_s, 1),
        "peak_rss_mb": round(memory.peak_mb),
        "bank": len(model.memory_bank_),
    }


def memory(counts: list[int], shard_images: int) -> list[dict]:
    rows = []
    for count in counts:
        command = [sys.executable, __file__, "--memory-run", str(count)]
        command += ["--shard-images", str(shard_images)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["updates", "bounded", "memory"])
    parser.add_argument("--datasets", nargs="+", default=["mvtec_bottle_512"])
    parser.add_argument("--images", nargs="+", type=int, default=[1000, 5000])
    parser.add_argument("--shard-images", type=int, default=None)
    parser.add_argument("--memory-run", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--image-folder", type=Path, default=None, help="with --memory-run: its PNG images"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.memory_run is not None:
        print(json.dumps(memory_run(args.memory_run, args.shard_images or 100, args.image_folder)))
        return
    results: dict = {}
    for dataset in args.datasets:
        root = DATASETS / dataset
        if "updates" in args.parts:
            results[f"updates {dataset}"] = updates(root)
        if "bounded" in args.parts:
            results[f"bounded {dataset}"] = bounded(root, args.shard_images or 50)
    if "memory" in args.parts:
        results["memory"] = memory(args.images, args.shard_images or 100)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
