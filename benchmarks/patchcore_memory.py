"""Peak memory and time of fitting PatchCore on many images (default: 1,000 at 256x256).

    .venv/bin/python benchmarks/patchcore_memory.py [--images 1000] [--size 256]

The images are synthetic normal texture crops (anomalens.data.synthetic), generated in memory.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import anomalens
from anomalens.data.synthetic import TEXTURES, normal_crop
from anomalens.evaluation.memory import PeakMemory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [normal_crop(TEXTURES[i % 3], rng, args.size) for i in range(args.images)]
    model = anomalens.create("patchcore", image_size=args.size)
    with PeakMemory() as memory:
        started = time.perf_counter()
        model.fit(images)
        fit_s = time.perf_counter() - started
    print(
        json.dumps(
            {
                "images": args.images,
                "image_size": args.size,
                "fit_s": round(fit_s, 1),
                "peak_rss_mb": round(memory.peak_mb),
                "memory_bank": len(model.memory_bank_),
                "images_held_in_memory_mb": round(args.images * args.size**2 * 3 / 2**20),
            }
        )
    )


if __name__ == "__main__":
    main()
