"""`anomalens fit --engine ray` against the local fit, on one machine.

    .venv/bin/python benchmarks/ray_fit.py [--data ../shared/datasets/mvtec_bottle_512]
        [--shard-images 50] [--runs ray local exact] [--local-threads N]
        [--json benchmarks/out/ray_fit.json]

Default PatchCore on MVTec AD bottle `train/good` (209 images), fitted three ways: `ray`, shards
of `--shard-images` (50: 5 shards) on a local Ray instance with 2 actors of 1 CPU each
(`anomalens.deploy.ray_fit.fit_ray`); `local`, the same shards in this process (torch's
threads, or `--local-threads`); `exact`, one shard of all images (the paper's exact coreset).
Each is timed from the image list to the fitted model (actor start-ups included; the Ray
instance is started once before, as a running cluster would be) and evaluated on the 83 test images
(`anomalens.evaluation.evaluate`: image AUROC, pixel AUROC, AUPRO). Also reports how far the
Ray bank is from the local sharded one (same shards and seed): each Ray bank row's distance to
its nearest local bank row, relative to its norm. A run named again (`--runs ray local ray
local`) is timed again, not evaluated. Results are printed, and written to `--json`, after each
run.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import ray
import torch

import anomalens
from anomalens.data.mvtec import training_images
from anomalens.deploy.ray_fit import fit_ray
from anomalens.evaluation.evaluator import evaluate

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mvtec_bottle_512"
KEYS = ("image_auroc", "pixel_auroc", "aupro")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--shard-images", type=int, default=50)
    parser.add_argument("--runs", nargs="+", default=["ray", "local", "exact"])
    parser.add_argument(
        "--local-threads", type=int, help="torch threads of the local fits (default: torch's)"
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/out/ray_fit.json"))
    args = parser.parse_args()
    images = training_images(args.data)
    results: dict[str, dict] = {}
    banks: dict[str, np.ndarray] = {}
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    threads = torch.get_num_threads()
    for run in args.runs:
        shards = len(images) if run == "exact" else args.shard_images
        model = anomalens.create("patchcore", shard_images=shards)
        started = time.perf_counter()
        if run == "ray":
            fit_ray(model, images, actors=2)
        else:
            if args.local_threads:
                torch.set_num_threads(args.local_threads)
            model.fit(images)
            torch.set_num_threads(threads)
        fit_s = time.perf_counter() - started
        if run in results:  # a repeat: timed only
            results[run]["fit_s_repeats"].append(round(fit_s, 1))
            print(run, results[run], flush=True)
            continue
        banks[run] = model.memory_bank_.numpy()
        found = evaluate(model, args.data).metrics
        results[run] = {key: round(found[key], 4) for key in KEYS} | {
            "fit_s_repeats": [round(fit_s, 1)],
            "bank": len(banks[run]),
            "image_threshold": model.image_threshold_,
        }
        if "ray" in banks and "local" in banks:
            ray_bank, local_bank = banks["ray"], banks["local"]
            same_shape = ray_bank.shape == local_bank.shape
            # each Ray bank row's nearest local bank row, relative to the row's norm
            nearest = torch.cdist(
                torch.from_numpy(ray_bank).double(),
                torch.from_numpy(local_bank).double(),
                compute_mode="donot_use_mm_for_euclid_dist",  # exact, not |a|^2 + |b|^2 - 2ab
            )
            relative = nearest.min(dim=1).values / torch.linalg.vector_norm(
                torch.from_numpy(ray_bank).double(), dim=1
            )
            results["ray_vs_local_bank"] = {
                "same_shape": same_shape,
                "same_order_max_abs_diff": (
                    float(np.abs(ray_bank - local_bank).max()) if same_shape else None
                ),
                "rows_within_1e-5_of_a_local_row": int((relative <= 1e-5).sum()),
                "max_relative_distance_to_nearest_local_row": float(relative.max()),
            }
        print(run, results[run], flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    ray.shutdown()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
