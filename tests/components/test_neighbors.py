"""Greedy k-center coreset, exact nearest-neighbour search and the compressed search re-ranked
exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalens.components import neighbors
from anomalens.components.neighbors import (
    CompressedIndex,
    NearestNeighbors,
    argmin_rows,
    greedy_coreset,
    nearest_by_matmul,
    nearest_by_rerank,
    nearest_distances,
)


def _covering_radius(points: np.ndarray, chosen: np.ndarray) -> float:
    distances, _ = NearestNeighbors(points[chosen]).search(points, 1)
    return float(distances.max())


def test_search_is_exact() -> None:
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(300, 16)), rng.normal(size=(50, 16))
    distances, indices = NearestNeighbors(bank).search(queries, 3)
    brute = np.linalg.norm(queries[:, None] - bank[None], axis=-1)
    np.testing.assert_array_equal(indices, np.argsort(brute, axis=1)[:, :3])
    np.testing.assert_allclose(distances, np.sort(brute, axis=1)[:, :3], rtol=1e-4)


def test_coreset_covers_every_cluster_where_random_sampling_does_not() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=20, size=(20, 32))
    sizes = rng.integers(5, 400, size=20)
    points = np.concatenate(
        [c + rng.normal(size=(n, 32)) for c, n in zip(centres, sizes, strict=True)]
    )
    chosen = greedy_coreset(points, ratio=40 / len(points), projection_dim=16, seed=0)
    assert len(chosen) == 40 and len(set(chosen.tolist())) == 40
    random = rng.choice(len(points), 40, replace=False)
    assert _covering_radius(points, chosen) < 0.5 * _covering_radius(points, random)
    cluster_of = np.repeat(np.arange(20), sizes)
    assert set(cluster_of[chosen]) == set(range(20))


def test_coreset_is_seeded() -> None:
    points = np.random.default_rng(2).normal(size=(500, 8)).astype(np.float32)
    a = greedy_coreset(points, 0.1, seed=5)
    assert np.array_equal(a, greedy_coreset(points, 0.1, seed=5))
    assert not np.array_equal(a, greedy_coreset(points, 0.1, seed=6))


@pytest.mark.parametrize("block", [None, 300 * 7])
def test_matrix_product_search_matches_brute_force(block, monkeypatch) -> None:
    """Also with the queries in blocks of 7 (15 blocks: the last one short)."""
    if block is not None:
        monkeypatch.setattr(neighbors, "SEARCH_BLOCK", block)
    rng = np.random.default_rng(3)
    bank = torch.from_numpy(rng.normal(size=(300, 16)).astype(np.float32))
    queries = torch.from_numpy(rng.normal(size=(2, 50, 16)).astype(np.float32))
    distances, nearest = nearest_by_matmul(queries, bank, (bank * bank).sum(dim=1))
    brute = torch.cdist(queries, bank[None].expand(2, -1, -1))
    assert nearest.shape == (2, 50) and torch.equal(nearest, brute.argmin(dim=-1))
    torch.testing.assert_close(distances, brute.amin(dim=-1), rtol=1e-5, atol=1e-5)


def test_nearest_distances_without_an_index_are_the_exact_ones() -> None:
    """The expanded form of the exported graph, on features of a patch distance's scale."""
    rng = np.random.default_rng(4)
    bank = torch.from_numpy(rng.normal(5.0, 3.0, size=(500, 152)).astype(np.float32))
    queries = torch.from_numpy(rng.normal(5.0, 3.0, size=(2, 64, 152)).astype(np.float32))
    queries[0, 0] = bank[7]  # a patch the bank holds: distance 0, not NaN
    norms = (bank * bank).sum(dim=1)
    distances = nearest_distances(queries, bank, norms)
    exact, _ = nearest_by_matmul(queries, bank, norms)
    assert distances.shape == (2, 64) and not distances.isnan().any()
    torch.testing.assert_close(distances[:, 1:], exact[:, 1:], rtol=1e-4, atol=0)
    assert distances[0, 0] < 0.05


def test_argmin_rows_is_torch_argmin_with_the_first_of_ties() -> None:
    values = torch.tensor([[3.0, 1.0, 1.0, 2.0], [0.0, 0.0, 5.0, -1.0]])
    assert argmin_rows(values).tolist() == values.argmin(dim=-1).tolist() == [1, 3]
    assert argmin_rows(values).dtype == torch.int64


@pytest.mark.parametrize("kind", ["pq", "ivfpq"])
def test_compressed_search_reranks_its_candidates_exactly(kind: str) -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(scale=4, size=(40, 32))
    bank = (centres[rng.integers(0, 40, 2000)] + rng.normal(size=(2000, 32))).astype(np.float32)
    noise = rng.normal(scale=0.3, size=(200, 32)).astype(np.float32)
    queries, vectors = torch.from_numpy(bank[:200] + noise), torch.from_numpy(bank)
    exact, exact_nearest = nearest_by_matmul(queries, vectors, (vectors * vectors).sum(dim=1))
    index = CompressedIndex(bank, kind, seed=0)
    distances, nearest = nearest_by_rerank(queries, vectors, index, rerank=32)
    # Exact distances to the candidate chosen: never below the true nearest, and mostly it.
    direct = torch.linalg.vector_norm(queries - vectors[nearest], dim=-1)
    torch.testing.assert_close(distances, direct)
    assert bool((distances >= exact - 1e-4).all())
    assert (nearest == exact_nearest).float().mean() > 0.95
    if kind == "pq":  # candidates covering the whole bank: the exact search
        _, everything = nearest_by_rerank(queries[:40], vectors, index, rerank=len(bank))
        assert torch.equal(everything, exact_nearest[:40])
    # Seeded: the same vectors build the same index.
    again = CompressedIndex(bank, kind, seed=0)
    assert np.array_equal(index.candidates(bank[:50], 8), again.candidates(bank[:50], 8))
