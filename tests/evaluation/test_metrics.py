"""Metrics checked against slow, obviously-correct reference computations on small cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from anomalens.errors import DataError
from anomalens.evaluation.metrics import (
    aupro,
    evaluate_predictions,
    image_aupr,
    image_auroc,
    image_f1_max,
    pixel_auroc,
    pro_curve,
)

# --- reference implementations -------------------------------------------------------------


def reference_auroc(labels, scores):
    """Mann-Whitney: fraction of (anomalous, normal) pairs ranked correctly, ties count 1/2."""
    pos = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    neg = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def reference_ap(labels, scores):
    """Average precision: sum over distinct thresholds of (recall increase) * precision."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    ap, prev_recall = 0.0, 0.0
    for t in np.unique(scores)[::-1]:
        flagged = scores >= t
        tp = np.sum(flagged & (labels == 1))
        recall = tp / np.sum(labels == 1)
        ap += (recall - prev_recall) * tp / np.sum(flagged)
        prev_recall = recall
    return ap


def reference_f1_max(labels, scores):
    labels, scores = np.asarray(labels), np.asarray(scores)
    best = 0.0
    for t in np.unique(scores):
        flagged = scores >= t
        tp = np.sum(flagged & (labels == 1))
        fp = np.sum(flagged & (labels == 0))
        fn = np.sum(~flagged & (labels == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def reference_aupro(masks, maps, fpr_limit):
    """Loop over every distinct threshold t, flag map > t, integrate PRO(FPR) up to fpr_limit."""
    regions = []
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, count + 1)]
    n_normal = sum(np.sum(~m) for m in masks)
    thresholds = [*np.unique(np.concatenate([a.ravel() for a in maps]))[::-1], -np.inf]
    points = []
    for t in thresholds:
        flagged = [a > t for a in maps]
        pro = np.mean([np.sum(flagged[i] & region) / np.sum(region) for i, region in regions])
        fpr = sum(np.sum(f & ~m) for f, m in zip(flagged, masks, strict=True)) / n_normal
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


# --- test data -----------------------------------------------------------------------------


def tiny_case(seed, quantize=False):
    """3 images of 12x12: two with a couple of rectangular/blob defects, one normal."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 12, 12), dtype=bool)
    for i in range(2):
        for _ in range(2):
            r, c = rng.integers(0, 10, size=2)
            h, w = rng.integers(1, 5, size=2)
            masks[i, r : r + h, c : c + w] = True
        masks[i] |= rng.random((12, 12)) < 0.03
    maps = (rng.random((3, 12, 12)) + 0.6 * masks).astype(np.float32)
    if quantize:
        maps = np.round(maps * 4) / 4
    return masks, maps


def random_image_scores(seed, n=40, ties=False):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    labels[:2] = [0, 1]
    scores = rng.normal(size=n) + labels
    if ties:
        scores = np.round(scores)
    return labels, scores


# --- image-level ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_image_metrics_match_references(seed, ties):
    labels, scores = random_image_scores(seed, ties=ties)
    assert image_auroc(labels, scores) == pytest.approx(reference_auroc(labels, scores))
    assert image_aupr(labels, scores) == pytest.approx(reference_ap(labels, scores))
    assert image_f1_max(labels, scores) == pytest.approx(reference_f1_max(labels, scores))


def test_image_metrics_perfect_and_types():
    labels = [0, 0, 1, 1, 1]
    scores = [0.1, 0.2, 0.5, 0.7, 0.9]
    for metric in (image_auroc, image_aupr, image_f1_max):
        value = metric(labels, scores)
        assert type(value) is float
        assert value == 1.0
    assert image_auroc(labels, scores[::-1]) == 0.0


@pytest.mark.parametrize("metric", [image_auroc, image_aupr, image_f1_max])
@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_image_metrics_reject_single_class(metric, labels):
    with pytest.raises(DataError, match="both normal"):
        metric(labels, [0.1, 0.2, 0.3])


def test_image_metrics_reject_bad_input():
    with pytest.raises(DataError, match="labels"):
        image_auroc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="2 labels but 3 scores"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])


# --- pixel AUROC ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("quantize", [False, True])
def test_pixel_auroc_matches_sklearn(seed, quantize):
    masks, maps = tiny_case(seed, quantize)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(list(masks), list(maps)) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_images_of_different_sizes():
    rng = np.random.default_rng(7)
    masks = [rng.random((5, 9)) < 0.3, rng.random((16, 4)) < 0.2]
    maps = [rng.random(m.shape) + m for m in masks]
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([a.ravel() for a in maps])
    )
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_metrics_reject_bad_input():
    masks, maps = tiny_case(0)
    with pytest.raises(DataError, match="normal and anomalous"):
        pixel_auroc(np.zeros_like(masks), maps)
    with pytest.raises(DataError, match="must be the same HxW"):
        pixel_auroc(masks, maps[:, :, :6])
    with pytest.raises(DataError, match="3 masks but 2"):
        pixel_auroc(masks, maps[:2])
    with pytest.raises(DataError, match="NaN"):
        pixel_auroc(masks, np.where(masks, np.nan, maps))


# --- AUPRO ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("fpr_limit", [0.3, 1.0])
def test_aupro_matches_threshold_loop(seed, quantize, fpr_limit):
    masks, maps = tiny_case(seed, quantize)
    expected = reference_aupro(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_perfect_and_inverted_detector(fpr_limit):
    masks, _ = tiny_case(3)
    perfect = np.where(masks, 1.0, 0.0) + 0.01 * np.random.default_rng(0).random(masks.shape)
    assert aupro(masks, perfect, fpr_limit) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, -perfect, fpr_limit) == pytest.approx(0.0, abs=1e-12)


def test_aupro_regions_are_eight_connected():
    # An L of 3 pixels touching a 4th pixel only diagonally: one region of 4 pixels.
    mask = np.zeros((6, 6), dtype=bool)
    mask[[0, 0, 1, 2], [0, 1, 0, 1]] = True
    amap = np.zeros((6, 6))
    amap[2, 1] = 1.0  # only the diagonal pixel is detected
    fpr, pro = pro_curve([mask], [amap], fpr_limit=1.0)
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.25, 1.0])  # 4-connectivity would give 0.5


def test_pro_curve_shape():
    masks, maps = tiny_case(1)
    fpr, pro = pro_curve(masks, maps, fpr_limit=0.3)
    assert fpr[0] == 0.0 and pro[0] == 0.0
    assert fpr[-1] == pytest.approx(0.3)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert fpr.dtype == pro.dtype == np.float64


def test_aupro_rejects_bad_input():
    masks, maps = tiny_case(0)
    with pytest.raises(DataError, match="anomalous region"):
        aupro(np.zeros_like(masks), maps)
    with pytest.raises(DataError, match="normal pixels"):
        aupro(np.ones_like(masks), maps)
    with pytest.raises(DataError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)


# --- evaluate_predictions ------------------------------------------------------------------


def test_evaluate_predictions_image_only():
    labels, scores = random_image_scores(0)
    result = evaluate_predictions(labels, scores)
    assert result == {
        "image_auroc": image_auroc(labels, scores),
        "image_aupr": image_aupr(labels, scores),
        "image_f1_max": image_f1_max(labels, scores),
        "pixel_auroc": None,
        "aupro": None,
    }


def test_evaluate_predictions_with_maps_skips_missing_maps():
    masks, maps = tiny_case(2)
    labels = [1, 1, 0, 0]
    scores = [0.9, 0.8, 0.1, 0.5]
    all_masks = [masks[0], masks[1], None, np.zeros((4, 4), dtype=bool)]
    all_maps = [maps[0], maps[1], maps[2], None]  # last image has no map
    result = evaluate_predictions(labels, scores, all_masks, all_maps)
    assert set(result) == {"image_auroc", "image_aupr", "image_f1_max", "pixel_auroc", "aupro"}
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in result.values())
    assert result["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps))
    assert result["aupro"] == pytest.approx(aupro(masks, maps))
    assert evaluate_predictions(labels, scores, all_masks, [None] * 4)["aupro"] is None
    with pytest.raises(DataError, match="counts must match"):
        evaluate_predictions(labels, scores, all_masks[:3], all_maps)
