"""Threshold selection checked against brute force and the empirical FPR it promises."""

from __future__ import annotations

import numpy as np
import pytest

from anomalens.core.thresholds import (
    TailQuantile,
    f1_optimal_threshold,
    pixel_f1_optimal_threshold,
    threshold_at_fpr,
)
from anomalens.errors import DataError


def f1_of(labels, flagged):
    labels = np.asarray(labels, dtype=bool)
    tp = np.sum(flagged & labels)
    return 2 * tp / (np.sum(flagged) + np.sum(labels))


# --- threshold_at_fpr ----------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.001, 0.01, 0.05, 0.3, 0.9])
def test_threshold_at_fpr_gives_requested_fpr(target):
    normal = np.random.default_rng(0).normal(size=20_000)
    threshold = threshold_at_fpr(normal, target)
    assert abs(np.mean(normal > threshold) - target) <= 1 / normal.size


def test_threshold_at_fpr_below_resolution_is_max():
    normal = np.random.default_rng(1).random(50)
    assert threshold_at_fpr(normal, 0.01) == normal.max()
    assert np.mean(normal > threshold_at_fpr(normal, 0.01)) == 0.0


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5])
def test_threshold_at_fpr_rejects_bad_target(target):
    with pytest.raises(DataError, match="target_fpr"):
        threshold_at_fpr([0.1, 0.2], target)


@pytest.mark.parametrize("scores", [[], [0.1, np.nan], [np.inf]])
def test_threshold_at_fpr_rejects_bad_scores(scores):
    with pytest.raises(DataError):
        threshold_at_fpr(scores, 0.1)


# --- TailQuantile --------------------------------------------------------------------------


def tail_threshold(parts, target, max_count):
    tail = TailQuantile(target, max_count)
    for part in parts:
        tail.add(part)
    return tail.threshold()


@pytest.mark.parametrize("target", [0.0005, 0.001, 0.01, 0.3, 0.9])
@pytest.mark.parametrize("spare", [0, 5_000, None])
def test_tail_quantile_matches_the_whole_quantile(target, spare):
    """Parts of uneven sizes, one holding most of the largest values, and a `max_count` equal to
    or above the true count, or none: the same threshold as on every value at once; with a bound
    only the running top is held, not the parts."""
    rng = np.random.default_rng(2)
    parts = [rng.normal(size=size).astype(np.float32) for size in (700, 3, 4096, 1, 2500)]
    parts[2][:300] += 6.0
    count = sum(part.size for part in parts)
    want = threshold_at_fpr(np.concatenate(parts), target)
    tail = TailQuantile(target, None if spare is None else count + spare)
    for part in parts:
        tail.add(part)
    if spare is not None and target <= 0.01:
        held = tail._top.size + sum(part.size for part in tail._pending)
        assert held < count / 5
    assert tail.threshold() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_tail_quantile_below_resolution_is_max():
    parts = [np.random.default_rng(3).random(30), np.array([0.5, 2.0])]
    assert tail_threshold(parts, 0.01, 100) == 2.0


@pytest.mark.parametrize("parts", [[], [np.array([0.1, np.nan])], [np.zeros(0)]])
def test_tail_quantile_rejects_bad_values(parts):
    with pytest.raises(DataError):
        tail_threshold(parts, 0.1, 10)


def test_tail_quantile_refuses_more_values_than_its_bound():
    with pytest.raises(ValueError, match="max_count"):
        tail_threshold([np.zeros(20)], 0.1, 10)


# --- f1_optimal_threshold ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_f1_optimal_threshold_matches_brute_force(seed, ties):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=60)
    labels[:2] = [0, 1]
    scores = rng.normal(size=60) + labels
    if ties:
        scores = np.round(scores * 2) / 2
    brute = max(f1_of(labels, scores >= t) for t in np.unique(scores))

    threshold, f1 = f1_optimal_threshold(labels, scores)
    assert type(threshold) is float and type(f1) is float
    assert f1 == pytest.approx(brute)
    # The threshold lies strictly between observed scores and reproduces the F1 with >= and >.
    assert threshold not in scores
    assert f1_of(labels, scores >= threshold) == pytest.approx(f1)
    assert f1_of(labels, scores > threshold) == pytest.approx(f1)


def test_f1_optimal_threshold_is_midpoint():
    threshold, f1 = f1_optimal_threshold([0, 0, 1, 1], [0.1, 0.4, 0.6, 0.9])
    assert (threshold, f1) == (pytest.approx(0.5), 1.0)


def test_f1_optimal_threshold_flag_everything():
    threshold, f1 = f1_optimal_threshold([1, 1, 1, 0], [0.1, 0.2, 0.3, 0.9])
    assert threshold == 0.1
    assert f1 == pytest.approx(6 / 7)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_f1_optimal_threshold_rejects_single_class(labels):
    with pytest.raises(DataError, match="both normal"):
        f1_optimal_threshold(labels, [0.1, 0.2, 0.3])


# --- pixel_f1_optimal_threshold ------------------------------------------------------------


def pixel_case(seed, n=4, size=32):
    rng = np.random.default_rng(seed)
    masks = rng.random((n, size, size)) < 0.1
    maps = rng.random((n, size, size)).astype(np.float32) + 0.5 * masks
    return masks, maps


def test_pixel_f1_optimal_threshold_equals_flattened():
    masks, maps = pixel_case(0)
    assert pixel_f1_optimal_threshold(masks, maps) == f1_optimal_threshold(
        masks.ravel(), maps.ravel()
    )


def test_pixel_f1_optimal_threshold_subsample_is_deterministic_and_close():
    masks, maps = pixel_case(1, n=8, size=64)
    exact_threshold, exact_f1 = pixel_f1_optimal_threshold(masks, maps)
    sampled = pixel_f1_optimal_threshold(masks, maps, max_pixels=8_000)
    assert sampled == pixel_f1_optimal_threshold(list(masks), list(maps), max_pixels=8_000)
    assert sampled != (exact_threshold, exact_f1)
    threshold, _ = sampled
    assert f1_of(masks.ravel(), maps.ravel() >= threshold) == pytest.approx(exact_f1, abs=0.02)


def test_pixel_f1_optimal_threshold_rejects_bad_input():
    masks, maps = pixel_case(2)
    with pytest.raises(DataError, match="both normal"):
        pixel_f1_optimal_threshold(np.zeros_like(masks), maps, max_pixels=100)
    with pytest.raises(DataError, match="same HxW"):
        pixel_f1_optimal_threshold(masks, maps[:, 1:])
    with pytest.raises(DataError, match="max_pixels"):
        pixel_f1_optimal_threshold(masks, maps, max_pixels=0)
