"""The search alone: 1,024 query patches (one 256 px image) against clustered random banks of
152-dimensional patches, one thread: the exact matrix product against the `ivfpq` and `pq`
candidates re-ranked exactly, with each index's build time and how often it finds the exact
nearest patch.

    .venv/bin/python benchmarks/bank_index_search.py [--sizes 21402 100000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import faiss
import numpy as np
import torch

from anomalens.components.neighbors import CompressedIndex, nearest_by_matmul, nearest_by_rerank


def median_ms(run: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return round(1000 * float(np.median(times)), 1)


def measure(size: int, rng: np.random.Generator) -> None:
    centres = rng.normal(scale=2, size=(200, 152)).astype(np.float32)
    bank = (centres[rng.integers(0, 200, size)] + rng.normal(size=(size, 152))).astype(np.float32)
    noise = rng.normal(scale=0.3, size=(1024, 152)).astype(np.float32)
    queries, vectors = torch.from_numpy(bank[:1024] + noise), torch.from_numpy(bank)
    norms = (vectors * vectors).sum(dim=1)
    _, exact = nearest_by_matmul(queries, vectors, norms)
    print(size, "flat ms", median_ms(lambda: nearest_by_matmul(queries, vectors, norms)))
    for kind in ("ivfpq", "pq"):
        started = time.perf_counter()
        index = CompressedIndex(bank, kind)
        build_s = round(time.perf_counter() - started, 1)
        _, nearest = nearest_by_rerank(queries, vectors, index, 32)
        ms = median_ms(lambda index=index: nearest_by_rerank(queries, vectors, index, 32))
        found = float((nearest == exact).float().mean())
        print(size, kind, "build s", build_s, "ms", ms, "same nearest", found, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[21402, 100000])
    args = parser.parse_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    for size in args.sizes:
        measure(size, rng)


if __name__ == "__main__":
    main()
