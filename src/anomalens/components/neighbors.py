"""Exact nearest-neighbour search (FAISS) and greedy k-center coreset subsampling."""

from __future__ import annotations

import faiss
import numpy as np
import torch

from anomalens.progress import make_progress


class NearestNeighbors:
    """Exact L2 nearest neighbours over a fixed set of vectors (FAISS IndexFlatL2)."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index = faiss.IndexFlatL2(self.vectors.shape[1])
        self.index.add(self.vectors)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances (not squared) and indices of the `k` nearest vectors, (n, k) each."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        squared, indices = self.index.search(queries, min(k, len(self)))
        return np.sqrt(np.maximum(squared, 0.0)), indices


def greedy_coreset(
    features: np.ndarray | torch.Tensor,
    ratio: float,
    projection_dim: int = 64,
    seed: int = 0,
    description: str = "coreset",
    size: int | None = None,
) -> np.ndarray:
    """Indices of a greedy k-center coreset of `ratio` of the rows, or of `size` rows when given
    (PatchCore, Alg. 1).

    Distances are computed in a Johnson-Lindenstrauss random projection to `projection_dim`
    dimensions, as in the paper; memory is O(N * projection_dim): no N x N distance matrix.
    Starts from a seeded random row and repeatedly adds the row farthest from the chosen set.
    """
    features = torch.as_tensor(features, dtype=torch.float32)
    count = features.shape[0]
    target = max(1, min(count, round(count * ratio) if size is None else size))
    generator = torch.Generator().manual_seed(seed)
    if projection_dim and projection_dim < features.shape[1]:
        projection = torch.randn(features.shape[1], projection_dim, generator=generator)
        projected = features @ (projection / projection_dim**0.5)
    else:
        projected = features
    squared_norms = (projected * projected).sum(dim=1)
    min_distances = torch.full((count,), float("inf"))
    distances = torch.empty(count)
    selected = np.empty(target, dtype=np.int64)
    current = int(torch.randint(count, (1,), generator=generator))
    with make_progress() as progress:
        task = progress.add_task(description, total=target, info=f"{count} patches")
        for step in range(target):
            selected[step] = current
            torch.mv(projected, projected[current], out=distances)
            distances.mul_(-2.0).add_(squared_norms).add_(squared_norms[current])
            torch.minimum(min_distances, distances, out=min_distances)
            current = int(torch.argmax(min_distances))
            if step % 64 == 0:
                progress.update(task, completed=step)
        progress.update(task, completed=target)
    return selected


SEARCH_BLOCK = 1 << 25
"""Most entries (128 MB of floats) of one block of `nearest_by_matmul`'s distance matrix outside an
export: bigger products are computed a block of queries at a time."""


def nearest_by_matmul(
    queries: torch.Tensor, vectors: torch.Tensor, squared_norms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest neighbour of each query (..., D) among `vectors` (N, D), written as a matrix
    product and a reduction so that it traces and exports to ONNX.

    The argmin is over |v|^2 - 2 q.v (`squared_norms` = |v|^2, precomputed; one `addmm`, no
    temporary besides the product itself); the returned Euclidean distance |q - v*| is then
    computed directly, free of the cancellation error of the expanded form.
    """
    flat = queries.reshape(-1, queries.shape[-1])
    rows = max(1, SEARCH_BLOCK // max(1, len(vectors)))
    if torch.compiler.is_exporting() or len(flat) <= rows:
        nearest = argmin_rows(torch.addmm(squared_norms, flat, vectors.T, alpha=-2.0))
    else:  # queries in blocks: the product of 8 images' 8,192 patches and a 46,000-patch bank
        # would be 1.5 GB at once
        nearest = torch.cat(
            [
                argmin_rows(torch.addmm(squared_norms, block, vectors.T, alpha=-2.0))
                for block in flat.split(rows)
            ]
        )
    nearest = nearest.reshape(queries.shape[:-1])
    distances = torch.linalg.vector_norm(queries - vectors[nearest], dim=-1)
    return distances, nearest


def nearest_distances(
    queries: torch.Tensor, vectors: torch.Tensor, squared_norms: torch.Tensor
) -> torch.Tensor:
    """Euclidean distance from each query (..., D) to its nearest of `vectors` (N, D), from the
    expanded form sqrt(|q|^2 + min(|v|^2 - 2 q.v)) (`squared_norms` = |v|^2): one matrix product
    and a min, no index. For exported graphs: ONNX Runtime's ReduceMin over PatchCore's bank is
    about 10x faster than its ArgMin (0.09 against 0.93 ms for 1,024 x 2,140), and the
    expanded form's cancellation error is far below a patch distance."""
    flat = queries.reshape(-1, queries.shape[-1])
    closest = torch.addmm(squared_norms, flat, vectors.T, alpha=-2.0).amin(dim=-1)
    squared = (closest + (flat * flat).sum(dim=-1)).clamp_min(0.0)
    return squared.sqrt().reshape(queries.shape[:-1])


def argmin_rows(values: torch.Tensor) -> torch.Tensor:
    """Index of each row's minimum (the first one on ties), like `values.argmin(dim=-1)`.

    On a CPU tensor outside an export it is numpy's: 4-5x faster than torch's over the ~2,000
    bank columns of PatchCore's search, which makes it a sizeable part of predict at batch 1.
    """
    if torch.compiler.is_exporting() or values.requires_grad or values.device.type != "cpu":
        return values.argmin(dim=-1)
    return torch.from_numpy(values.numpy().argmin(axis=-1))


def k_nearest_by_matmul(
    queries: torch.Tensor, vectors: torch.Tensor, squared_norms: torch.Tensor, k: int
) -> torch.Tensor:
    """Euclidean distances (B, k) from each query (B, D) to its `k` nearest `vectors` (N, D),
    nearest first, as a matrix product and a top-k so that it exports to ONNX (the exact
    distances recomputed directly, as in `nearest_by_matmul`)."""
    _, nearest = (2.0 * queries @ vectors.T - squared_norms).topk(k, dim=-1)
    return torch.linalg.vector_norm(queries[:, None, :] - vectors[nearest], dim=-1)


COMPRESSED_INDEXES = ("pq", "ivfpq")
"""The compressed searches `CompressedIndex` builds (FAISS product quantisation)."""


class CompressedIndex:
    """Approximate L2 search over a product-quantised copy of `vectors` (Jegou et al., "Product
    quantization for nearest neighbor search", TPAMI 2011), for candidates that
    `nearest_by_rerank` then re-ranks exactly.

    `pq`: each vector cut into sub-vectors of about 8 dimensions, each coded by one of up to 256
    k-means centroids (one byte), searched exhaustively over the codes. `ivfpq`: a coarse k-means
    into ~4 sqrt(N) cells first, the residuals product-quantised, and only the `nprobe` nearest
    cells searched. Fewer centroids are trained for small sets (at least 39 training vectors per
    centroid, as FAISS asks). Training is seeded, so the same vectors give the same index.
    """

    def __init__(self, vectors: np.ndarray, kind: str, seed: int = 0, nprobe: int = 16) -> None:
        if kind not in COMPRESSED_INDEXES:
            raise ValueError(f"unknown compressed index {kind!r}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        count, dim = vectors.shape
        self.kind = kind
        subquantizers = _subquantizers(dim)
        if kind == "pq":
            bits = _code_bits(count)
            index = faiss.IndexPQ(dim, subquantizers, bits)
            _seed_clustering(index.pq.cp, seed)
        else:
            cells = int(np.clip(round(4 * count**0.5), 1, max(1, count // 39)))
            bits = _code_bits(count)
            quantizer = faiss.IndexFlatL2(dim)
            index = faiss.IndexIVFPQ(quantizer, dim, cells, subquantizers, bits)
            index.own_fields = True
            quantizer.this.disown()
            _seed_clustering(index.cp, seed)
            _seed_clustering(index.pq.cp, seed)
            index.nprobe = min(nprobe, cells)
        index.train(vectors)
        index.add(vectors)
        self.index = index

    def __len__(self) -> int:
        return self.index.ntotal

    def candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Indices (n, k) of each query's `k` approximately nearest vectors; -1 where the searched
        cells of an `ivfpq` index hold fewer than `k`."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return self.index.search(queries, min(k, len(self)))[1]

    def __getstate__(self) -> dict:
        """Picklable (for copies of a model): the index as FAISS's own serialisation."""
        return {"kind": self.kind, "index": faiss.serialize_index(self.index)}

    def __setstate__(self, state: dict) -> None:
        self.kind = state["kind"]
        self.index = faiss.deserialize_index(state["index"])


def _subquantizers(dim: int) -> int:
    """Sub-vectors of about 8 dimensions (the largest divisor of `dim` no greater than dim/8,
    at least 1)."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


def _code_bits(count: int) -> int:
    """Bits per sub-vector code: 8 (256 centroids) given enough vectors to train them."""
    return int(np.clip(np.floor(np.log2(max(count, 1) / 39)), 1, 8))


def _seed_clustering(parameters: faiss.ClusteringParameters, seed: int) -> None:
    parameters.seed = 1234 + seed
    parameters.verbose = False


def nearest_by_rerank(
    queries: torch.Tensor,
    vectors: torch.Tensor,
    index: CompressedIndex,
    rerank: int,
    chunk: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest neighbour of each query (..., D) among `vectors` (N, D), as `nearest_by_matmul`
    returns it, found by re-ranking `index`'s `rerank` candidates with their exact distances.

    It is exact whenever the true nearest vector is among the candidates; otherwise it returns
    the nearest candidate, never closer than the true one. A query whose cells hold no candidate
    at all is searched exhaustively.
    """
    flat = queries.reshape(-1, queries.shape[-1])
    found = torch.from_numpy(index.candidates(flat.numpy(), rerank))
    distances = torch.empty(len(flat))
    nearest = torch.empty(len(flat), dtype=torch.int64)
    for start in range(0, len(flat), chunk):
        rows = flat[start : start + chunk]
        candidates = found[start : start + chunk]
        valid = candidates >= 0
        exact = torch.linalg.vector_norm(
            rows[:, None, :] - vectors[candidates.clamp(min=0)], dim=-1
        )
        exact = exact.masked_fill(~valid, float("inf"))
        best, column = exact.min(dim=1)
        distances[start : start + chunk] = best
        nearest[start : start + chunk] = candidates.gather(1, column[:, None])[:, 0]
    missing = torch.isinf(distances).nonzero()[:, 0]
    if len(missing):
        norms = (vectors * vectors).sum(dim=1)
        distances[missing], nearest[missing] = nearest_by_matmul(flat[missing], vectors, norms)
    return distances.reshape(queries.shape[:-1]), nearest.reshape(queries.shape[:-1])
