"""Evaluation metrics for image-level detection and pixel-level localisation.

Scores and maps are "higher = more anomalous"; labels and masks use 1/True = anomalous.
Pixel metrics take per-image HxW ground-truth masks and anomaly maps (a list, or one stacked
NxHxW array) and compare map values in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from anomalens.core.thresholds import _binary_problem, _pixels, f1_optimal_threshold
from anomalens.errors import DataError

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of per-image scores (Hanley & McNeil 1982; ties count 1/2)."""
    # scikit-learn imported where used: `predict` imports this package for its overlays, and
    # scikit-learn adds 1.8 s to its start-up.
    from sklearn.metrics import roc_auc_score

    y, s = _binary_problem(labels, scores, "image_auroc")
    return float(roc_auc_score(y, s))


def image_aupr(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision of per-image scores, anomalous as the positive class.

    Step-wise area under the precision/recall curve, as scikit-learn's
    `average_precision_score` (no interpolation; Manning et al. 2008, ch. 8.4).
    """
    from sklearn.metrics import average_precision_score  # imported here: see `image_auroc`

    y, s = _binary_problem(labels, scores, "image_aupr")
    return float(average_precision_score(y, s))


def image_f1_max(labels: ArrayLike, scores: ArrayLike) -> float:
    """Best F1 over all thresholds of per-image scores (see `f1_optimal_threshold`)."""
    _, f1 = f1_optimal_threshold(labels, scores)
    return f1


def pixel_auroc(masks: Sequence[ArrayLike], maps: Sequence[ArrayLike]) -> float:
    """Pixel-wise ROC AUC over all pixels of all images (Bergmann et al., CVPR 2019).

    Computed exactly as the Mann-Whitney U statistic (Hanley & McNeil 1982; ties count 1/2):
    normal and anomalous scores are sorted once and counted with binary search, so memory is a
    few float32 copies of the pixels and 25M pixels take about a second.
    """
    is_anomalous, scores = _pixels(masks, maps)
    positives = np.sort(scores[is_anomalous])
    negatives = scores[~is_anomalous]
    del scores
    negatives.sort()
    if positives.size == 0 or negatives.size == 0:
        raise DataError("pixel_auroc needs both normal and anomalous pixels in the masks")
    below = np.searchsorted(negatives, positives, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(negatives, positives, side="right").sum(dtype=np.int64)
    u_statistic = (int(below) + int(below_or_tied)) / 2.0
    return float(u_statistic / (positives.size * negatives.size))


def pro_curve(
    masks: Sequence[ArrayLike], maps: Sequence[ArrayLike], fpr_limit: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve up to false-positive rate `fpr_limit`.

    Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021 (and CVPR 2019): every
    8-connected component of a ground-truth mask is a region. At threshold t, PRO is the mean
    over all regions of all images of ``|region ∩ (map > t)| / |region|``, and FPR is the
    fraction of normal pixels (over all images) with ``map > t``.

    Returns ``(fpr, pro)``, float64, non-decreasing, starting at (0, 0): one point per distinct
    map value (the curve changes only there), computed exactly from one sort of the scores.
    Points with ``fpr <= fpr_limit`` are kept and the curve is closed with a point interpolated
    linearly at exactly ``fpr_limit``.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise DataError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    masks, maps = list(masks), list(maps)
    is_anomalous, scores = _pixels(masks, maps)
    weights = _region_weights(masks)
    positives = scores[is_anomalous]
    negatives = scores[~is_anomalous]
    del scores, is_anomalous
    if negatives.size == 0:
        raise DataError("aupro needs normal pixels: every pixel of the masks is anomalous")
    negatives.sort()
    order = np.argsort(positives, kind="stable")
    positives = positives[order]
    # pro_above[i]: summed weight of positives[i:], i.e. PRO when exactly those are flagged.
    pro_above = np.append(np.cumsum(weights[order][::-1])[::-1], 0.0)

    # Only thresholds down to the first one whose FPR exceeds fpr_limit are needed.
    n_neg = negatives.size
    flagged_max = int(np.ceil(fpr_limit * n_neg))
    cut = negatives[n_neg - flagged_max - 1] if flagged_max < n_neg else -np.inf
    candidates = np.concatenate(
        [
            negatives[np.searchsorted(negatives, cut) :],
            positives[np.searchsorted(positives, cut) :],
        ]
    )
    # Threshold "just below v" flags exactly the pixels with score >= v.
    values = np.unique(candidates)[::-1]
    fpr = np.append(0.0, (n_neg - np.searchsorted(negatives, values)) / n_neg)
    pro = np.append(0.0, np.minimum(pro_above[np.searchsorted(positives, values)], 1.0))

    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if inside == fpr.size or fpr[inside - 1] == fpr_limit:
        return fpr[:inside], pro[:inside]
    x0, x1 = fpr[inside - 1], fpr[inside]
    y0, y1 = pro[inside - 1], pro[inside]
    pro_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    return np.append(fpr[:inside], fpr_limit), np.append(pro[:inside], pro_at_limit)


def aupro(masks: Sequence[ArrayLike], maps: Sequence[ArrayLike], fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to `fpr_limit` (Bergmann et al., IJCV 2021).

    Trapezoidal integral of `pro_curve` over FPR in [0, fpr_limit], divided by `fpr_limit`, so
    a perfect detector scores 1.0. Raises `DataError` if the masks contain no anomalous region.
    """
    fpr, pro = pro_curve(masks, maps, fpr_limit)
    area = float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1]) / 2.0)) / fpr_limit
    return min(max(area, 0.0), 1.0)


def evaluate_predictions(
    labels: ArrayLike,
    scores: ArrayLike,
    masks: Sequence[ArrayLike | None] | None = None,
    maps: Sequence[ArrayLike | None] | None = None,
) -> dict[str, float | None]:
    """All metrics for one test set, as plain floats.

    labels/scores: per image (1 = anomalous). masks/maps: per image, in the same order; images
    whose map is None are left out of the pixel metrics, and a None mask means "no anomalous
    pixel". Keys: ``image_auroc``, ``image_aupr``, ``image_f1_max``, ``pixel_auroc`` and
    ``aupro`` (FPR limit 0.3); the pixel values are None unless masks and maps are both given
    and at least one map is not None.
    """
    results: dict[str, float | None] = {
        "image_auroc": image_auroc(labels, scores),
        "image_aupr": image_aupr(labels, scores),
        "image_f1_max": image_f1_max(labels, scores),
        "pixel_auroc": None,
        "aupro": None,
    }
    if masks is None or maps is None:
        return results
    n_images = np.asarray(labels).size
    if not len(masks) == len(maps) == n_images:
        raise DataError(
            f"got {n_images} labels, {len(masks)} masks and {len(maps)} maps; counts must match"
        )
    used_masks, used_maps = [], []
    for mask, amap in zip(masks, maps, strict=True):
        if amap is None:
            continue
        amap = np.asarray(amap)
        used_maps.append(amap)
        used_masks.append(np.zeros(amap.shape, dtype=bool) if mask is None else mask)
    if used_maps:
        results["pixel_auroc"] = pixel_auroc(used_masks, used_maps)
        results["aupro"] = aupro(used_masks, used_maps)
    return results


def _region_weights(masks: list[ArrayLike]) -> np.ndarray:
    """Per anomalous pixel (flattened like `_pixels`): 1 / (its region's size * region count)."""
    per_image = []
    n_regions = 0
    for mask in masks:
        regions, count = ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT_CONNECTED)
        sizes = np.bincount(regions.ravel())
        per_image.append(1.0 / sizes[regions[regions > 0]])
        n_regions += count
    if n_regions == 0:
        raise DataError("aupro needs at least one anomalous region, but every mask is empty")
    return np.concatenate(per_image) / n_regions
