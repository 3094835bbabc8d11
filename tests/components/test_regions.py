"""Defect regions: connected components of a mask, their measurements, `predict`'s
`min_region_area`, the boxes on overlays and the results page."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from anomalens.components.regions import Region, find_regions
from anomalens.core.scorer import Scorer
from anomalens.errors import ParameterError
from anomalens.evaluation.viz import REGION_COLOUR, ResultRow, overlay, write_results_page


def two_defects() -> np.ndarray:
    """A 40x60 map with a 5x8 block (0.8, one pixel 0.9) and a diagonal of 3 pixels (2, 3, 1)
    that touch only at their corners."""
    anomaly_map = np.zeros((40, 60), np.float32)
    anomaly_map[5:10, 10:18] = 0.8
    anomaly_map[7, 12] = 0.9
    for offset, value in enumerate((2.0, 3.0, 1.0)):
        anomaly_map[20 + offset, 40 + offset] = value
    return anomaly_map


def test_two_separate_defects_give_two_exact_regions() -> None:
    anomaly_map = two_defects()
    diagonal, block = find_regions(anomaly_map, anomaly_map > 0.5)
    # the diagonal is one region (8-connectivity), and first: its max score is the higher
    assert diagonal.box == (40, 20, 43, 23) and diagonal.area == 3
    assert diagonal.centroid == (41.0, 21.0)
    assert diagonal.max_score == 3.0 and diagonal.mean_score == pytest.approx(2.0)
    assert diagonal.area_fraction == pytest.approx(3 / 2400)
    assert block.box == (10, 5, 18, 10) and block.area == 40
    assert block.centroid == (13.5, 7.0)
    assert block.max_score == pytest.approx(0.9)
    assert block.mean_score == pytest.approx((39 * 0.8 + 0.9) / 40)
    assert block.area_fraction == pytest.approx(40 / 2400)
    assert json.loads(json.dumps(block.to_dict())) == {
        "box": [10, 5, 18, 10],
        "area": 40,
        "area_fraction": pytest.approx(40 / 2400),
        "centroid": [13.5, 7.0],
        "max_score": pytest.approx(0.9),
        "mean_score": pytest.approx((39 * 0.8 + 0.9) / 40),
    }


def test_min_area_drops_the_smaller_region() -> None:
    anomaly_map = two_defects()
    mask = anomaly_map > 0.5
    assert [r.area for r in find_regions(anomaly_map, mask, min_area=3)] == [3, 40]
    assert [r.area for r in find_regions(anomaly_map, mask, min_area=4)] == [40]
    assert [r.area for r in find_regions(anomaly_map, mask, min_area=40)] == [40]
    assert find_regions(anomaly_map, mask, min_area=41) == ()
    assert find_regions(anomaly_map, np.zeros_like(mask)) == ()


def test_region_measurements_match_scipy() -> None:
    rng = np.random.default_rng(0)
    anomaly_map = ndimage.gaussian_filter(rng.random((64, 80)), 3).astype(np.float32)
    mask = anomaly_map > np.quantile(anomaly_map, 0.7)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    index = np.arange(1, count + 1)
    expected = {
        (x, y): (ndimage.maximum(anomaly_map, labels, n), ndimage.mean(anomaly_map, labels, n))
        for n, (y, x) in zip(index, ndimage.center_of_mass(mask, labels, index), strict=True)
    }
    regions = find_regions(anomaly_map, mask)
    assert len(regions) == count > 1
    for region in regions:
        assert (region.max_score, region.mean_score) == pytest.approx(expected[region.centroid])


@pytest.mark.parametrize("bad", [-1, 2.5, True, "4", None])
def test_min_area_must_be_a_non_negative_integer(bad) -> None:
    anomaly_map = two_defects()
    with pytest.raises(ParameterError, match="min_area must be a whole number"):
        find_regions(anomaly_map, anomaly_map > 0.5, bad)


class RedScorer(Scorer):
    """A fitted scorer whose anomaly map is the image's red channel (in [0, 1]) and whose score is
    the map's maximum: image threshold 0.7, pixel threshold 0.5."""

    name = "red"
    produces_maps = True
    image_size = 32
    batch_size = 4
    image_threshold_ = 0.7
    pixel_threshold_ = 0.5

    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        maps = pixels[:, 0].numpy().copy()
        return maps.max(axis=(1, 2)), maps


def image_with(*patches: tuple[slice, slice, int], shape: tuple[int, int] = (32, 32)) -> np.ndarray:
    image = np.zeros((*shape, 3), np.uint8)
    for rows, columns, red in patches:
        image[rows, columns, 0] = red
    return image


def test_predict_fills_regions_of_anomalous_images_only() -> None:
    anomalous = image_with((slice(2, 6), slice(3, 9), 255), (slice(20, 22), slice(20, 22), 200))
    # pixels over the pixel threshold but a score under the image threshold: a normal image
    normal = image_with((slice(10, 14), slice(10, 14), 160))
    first, second = RedScorer().predict([anomalous, normal])
    assert first.label and [r.box for r in first.regions] == [(3, 2, 9, 6), (20, 20, 22, 22)]
    assert [r.area for r in first.regions] == [24, 4]
    assert not second.label and second.mask.any() and second.regions == ()
    (only,) = RedScorer().predict([anomalous], min_region_area=5)[0].regions
    assert only.box == (3, 2, 9, 6) and only.max_score == pytest.approx(1.0)


def test_regions_are_at_the_original_resolution() -> None:
    """A 48x64 image is scored at 32x32; its region is measured on the map resized back."""
    image = image_with((slice(12, 36), slice(16, 48), 255), shape=(48, 64))
    (region,) = RedScorer().predict([image])[0].regions
    assert np.abs(np.array(region.box) - (16, 12, 48, 36)).max() <= 2
    assert region.area == pytest.approx(24 * 32, rel=0.15)
    assert region.centroid == pytest.approx((31.5, 23.5), abs=1.0)


@pytest.mark.parametrize("bad", [-3, 1.5, "10"])
def test_predict_refuses_a_bad_min_region_area(bad) -> None:
    with pytest.raises(ParameterError, match="min_region_area must be a whole number"):
        RedScorer().predict([image_with()], min_region_area=bad)


def test_overlay_draws_each_region_box() -> None:
    anomaly_map = two_defects()
    regions = find_regions(anomaly_map, anomaly_map > 0.5)
    image = np.full((40, 60, 3), 90, np.uint8)
    picture = overlay(image, anomaly_map, 0.5, anomaly_map > 0.5, regions=regions)
    is_box = (picture == REGION_COLOUR).all(axis=-1)
    plain = (overlay(image, anomaly_map, 0.5, anomaly_map > 0.5) == REGION_COLOUR).all(axis=-1)
    assert not plain.any()
    # the block's box [10, 5, 18, 10): a 2-pixel frame inside its edge, its inside untouched
    expected = np.zeros((40, 60), bool)
    expected[5:10, 10:18] = True
    expected[7:8, 12:16] = False
    # the 3x3 diagonal's box is all frame
    expected[20:23, 40:43] = True
    np.testing.assert_array_equal(is_box, expected)


def test_results_page_shows_region_count_and_largest_area(tmp_path: Path) -> None:
    anomaly_map = two_defects()
    regions = find_regions(anomaly_map, anomaly_map > 0.5)
    picture = np.zeros((40, 60, 3), np.uint8)
    rows = [
        ResultRow("bad.png", 3.0, True, picture, regions=regions),
        ResultRow("good.png", 0.1, False, picture),
    ]
    page = write_results_page(tmp_path / "index.html", "regions", rows).read_text()
    assert "2 regions, largest 40 px (1.67%)" in page
    assert page.count("largest") == 1, "a normal image's caption has no regions line"
    one = [Region((0, 0, 1, 1), 1, 0.5, (0.0, 0.0), 1.0, 1.0)]
    single = ResultRow("one.png", 1.0, True, picture, regions=one)
    page = write_results_page(tmp_path / "one.html", "regions", [single]).read_text()
    assert "1 region, largest 1 px (50.00%)" in page
