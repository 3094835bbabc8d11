"""Choosing decision thresholds for anomaly scores.

Conventions: scores are "higher = more anomalous". `threshold_at_fpr` calls a sample anomalous
when ``score > threshold``; `f1_optimal_threshold` when ``score >= threshold``. Because the F1
threshold is placed halfway between two observed scores, both rules agree on it except in the
one case documented there.

This module also holds the input checks and the single precision/recall/F1 sweep that
`anomalens.evaluation.metrics` reuses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from anomalens.errors import DataError

DEFAULT_MAX_PIXELS = 5_000_000
"""Pixel count above which `pixel_f1_optimal_threshold` works on a subsample."""


def threshold_at_fpr(normal_scores: ArrayLike, target_fpr: float) -> float:
    """Threshold above which a fraction `target_fpr` of the given normal scores lies.

    It is the empirical ``1 - target_fpr`` quantile of `normal_scores` with linear interpolation
    (Hyndman & Fan 1996, definition 7, numpy's default), so on these scores the false-positive
    rate of the rule ``score > threshold`` is within ``1/n`` of `target_fpr` for n scores.
    With n normal scores an FPR below ``1/n`` cannot be resolved: if ``target_fpr < 1/n`` the
    threshold is the maximum normal score (empirical FPR 0).
    """
    _check_target_fpr(target_fpr)
    scores = np.asarray(normal_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise DataError("threshold_at_fpr needs at least one normal score, got none")
    _check_finite(scores)
    if target_fpr < 1.0 / scores.size:
        return float(scores.max())
    return float(np.quantile(scores, 1.0 - target_fpr))


class TailQuantile:
    """`threshold_at_fpr` of values added part by part (e.g. every pixel of the held-out anomaly
    maps, batch by batch), from the largest ones only.

    The 1 - `target_fpr` quantile of n values depends only on the largest ~`target_fpr` x n, so
    given `max_count`, a bound on n, a running top of that many (enough for any n up to it) is
    merged with the parts as they come and the parts are not kept: for 2,000 maps of 256x256
    pixels at `target_fpr` 0.001, 131,000 values instead of 131 million (0.5 GB of maps, then
    2.5 GB for a float64 copy and the quantile's own). Without a bound the parts are kept until
    `threshold`, which then finds the top the same way, without a float64 copy of them all.
    """

    def __init__(self, target_fpr: float, max_count: int | None = None) -> None:
        _check_target_fpr(target_fpr)
        self.target_fpr = target_fpr
        self.max_count = max_count
        self._keep = None if max_count is None else self._kept(max_count)
        self.count = 0
        self._top = np.empty(0, dtype=np.float64)
        self._pending: list[np.ndarray] = []
        self._pending_count = 0

    def add(self, values: ArrayLike) -> None:
        """Count `values` in (any shape); DataError if any is NaN or infinite."""
        values = np.asarray(values).ravel()
        _check_finite(values)
        self.count += values.size
        if self.max_count is not None and self.count > self.max_count:
            raise ValueError(f"TailQuantile got {self.count} values, more than its max_count")
        self._pending.append(values)
        self._pending_count += values.size
        if self._keep is not None and self._pending_count >= self._keep:
            self._merge(self._keep)

    def threshold(self) -> float:
        """The threshold `threshold_at_fpr` gives on all the values added."""
        if self.count == 0:
            raise DataError("threshold_at_fpr needs at least one normal score, got none")
        self._merge(self._kept(self.count) if self._keep is None else self._keep)
        top = np.sort(self._top)
        if self.target_fpr < 1.0 / self.count:
            return float(top[-1])
        position = (self.count - 1) * (1.0 - self.target_fpr)
        lower = int(np.floor(position))
        offset = self.count - top.size  # the values below the top, never kept
        below = top[lower - offset]
        above = top[min(lower + 1, self.count - 1) - offset]
        return float(below + (above - below) * (position - lower))

    def _kept(self, count: int) -> int:
        """Values from sorted position `floor((count - 1) * (1 - fpr))` on: a number that never
        decreases with `count`; two spare for the rounding of numpy's own position."""
        return count - int(np.floor((count - 1) * (1.0 - self.target_fpr))) + 2

    def _merge(self, keep: int) -> None:
        """The `keep` largest of the running top and the pending parts become the running top,
        merged a few parts at a time (linear time, memory for about twice `keep` values)."""
        group: list[np.ndarray] = []
        size = 0
        for part in self._pending:
            group.append(part)
            size += part.size
            if size >= keep:
                self._top = _largest(np.concatenate([self._top, *group]), keep)
                group, size = [], 0
        self._top = _largest(np.concatenate([self._top, *group]), keep)
        self._pending, self._pending_count = [], 0


def _largest(values: np.ndarray, count: int) -> np.ndarray:
    """The `count` largest of `values` (all of them when there are no more), in no order."""
    if values.size <= count:
        return values.astype(np.float64, copy=False)
    return np.partition(values, values.size - count)[values.size - count :]


def _check_target_fpr(target_fpr: float) -> None:
    if not 0.0 < target_fpr < 1.0:
        raise DataError(f"target_fpr must be strictly between 0 and 1, got {target_fpr}")


def _check_finite(scores: np.ndarray) -> None:
    if not np.isfinite(scores).all():
        raise DataError("normal scores contain NaN or infinite values")


def f1_optimal_threshold(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Threshold maximising F1 (van Rijsbergen 1979) for the rule ``anomalous = score >= t``.

    labels: 1 = anomalous, 0 = normal; both classes must be present.
    Returns ``(threshold, f1)``. All distinct scores are tried as cut-offs; the returned threshold
    is the midpoint between the best cut-off score and the next lower observed score, so it does
    not sit on a sample. If the best rule flags every sample, the threshold is the lowest score.
    Ties in F1 go to the highest threshold.
    """
    y, s = _binary_problem(labels, scores, "f1_optimal_threshold")
    cutoffs, f1 = _f1_sweep(y, s)
    best = int(np.argmax(f1))
    if best + 1 < cutoffs.size:
        threshold = (float(cutoffs[best]) + float(cutoffs[best + 1])) / 2.0
    else:
        threshold = float(cutoffs[best])
    return threshold, float(f1[best])


def pixel_f1_optimal_threshold(
    masks: Sequence[ArrayLike],
    maps: Sequence[ArrayLike],
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[float, float]:
    """`f1_optimal_threshold` over all pixels of ground-truth `masks` and anomaly `maps`.

    masks: HxW boolean arrays (True = anomalous pixel); maps: float arrays of the same shapes.
    Scores are compared in float32. When there are more than `max_pixels` pixels, a
    deterministic (seed 0) subsample of `max_pixels` pixels, drawn with replacement separately
    from the anomalous and the normal pixels in their original proportion, is used instead.
    Returns ``(threshold, f1)``; the F1 is that of the (sub)sample.
    """
    if max_pixels < 1:
        raise DataError(f"max_pixels must be at least 1, got {max_pixels}")
    is_anomalous, scores = _pixels(masks, maps)
    if scores.size > max_pixels:
        rng = np.random.default_rng(0)
        fraction = max_pixels / scores.size
        parts = []
        for values in (scores[is_anomalous], scores[~is_anomalous]):
            count = min(values.size, max(1, round(fraction * values.size)))
            parts.append(values[rng.integers(0, values.size, size=count)])
        is_anomalous = np.repeat([True, False], [parts[0].size, parts[1].size])
        scores = np.concatenate(parts)
    return f1_optimal_threshold(is_anomalous, scores)


def _f1_sweep(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F1 of ``score >= c`` for every distinct score c, in descending order of c."""
    order = np.argsort(scores, kind="stable")[::-1]
    ranked = scores[order]
    true_pos = np.cumsum(labels[order], dtype=np.int64)
    flagged = np.arange(1, ranked.size + 1, dtype=np.int64)
    group_end = np.append(ranked[1:] != ranked[:-1], True)
    true_pos, flagged = true_pos[group_end], flagged[group_end]
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (flagged + positives)
    f1 = 2.0 * true_pos / (flagged + true_pos[-1])
    return ranked[group_end], f1


def _binary_problem(
    labels: ArrayLike, scores: ArrayLike, caller: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate per-sample 0/1 labels and finite scores; return them as bool and float64."""
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.size != s.size:
        raise DataError(f"{caller}: got {y.size} labels but {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise DataError(f"{caller}: labels must be 0 (normal) or 1 (anomalous)")
    if not np.isfinite(s).all():
        raise DataError(f"{caller}: scores contain NaN or infinite values")
    y = y.astype(bool)
    if y.all() or not y.any():
        present = "anomalous (1)" if y.any() else "normal (0)"
        raise DataError(
            f"{caller} needs both normal (0) and anomalous (1) samples, got only {present}"
        )
    return y, s


def _pixels(masks: Sequence[ArrayLike], maps: Sequence[ArrayLike]) -> tuple[np.ndarray, np.ndarray]:
    """Validate masks/maps pairs and flatten them into (bool is_anomalous, float32 scores)."""
    masks, maps = list(masks), list(maps)
    if len(masks) != len(maps):
        raise DataError(f"got {len(masks)} masks but {len(maps)} anomaly maps")
    if not masks:
        raise DataError("no masks and anomaly maps given")
    pairs = [(np.asarray(m, dtype=bool), np.asarray(a)) for m, a in zip(masks, maps, strict=True)]
    for i, (mask, amap) in enumerate(pairs):
        if amap.ndim != 2 or mask.shape != amap.shape:
            raise DataError(
                f"image {i}: mask shape {mask.shape} and map shape {amap.shape} "
                "must be the same HxW"
            )
    total = sum(mask.size for mask, _ in pairs)
    is_anomalous = np.empty(total, dtype=bool)
    scores = np.empty(total, dtype=np.float32)
    start = 0
    for mask, amap in pairs:
        stop = start + mask.size
        is_anomalous[start:stop] = mask.ravel()
        scores[start:stop] = amap.ravel()
        start = stop
    if not np.isfinite(scores).all():
        raise DataError("anomaly maps contain NaN or infinite values (after conversion to float32)")
    return is_anomalous, scores
