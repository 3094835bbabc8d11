"""Every method: the same seed gives the same model, and predict gives the same scores and maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import anomalens
from anomalens.data.mvtec import test_samples, training_images

CASES = {
    "patchcore": {"coreset_ratio": 0.1},
    "patchcore-handcrafted": {"backbone": "handcrafted", "coreset_ratio": 0.1},
    "padim": {},
    "padim-handcrafted": {"backbone": "handcrafted"},
    "gaussian": {},
    "knn": {},
    "tiled": {
        "detector": "padim",
        "detector_params": {"backbone": "handcrafted"},
        "tile_size": 64,
        "tile_overlap": 16,
    },
}


@pytest.mark.parametrize("case", CASES)
def test_predict_is_deterministic_for_a_fixed_seed(case: str, brick: Path) -> None:
    name = case.split("-")[0]
    images = training_images(brick)[:8]
    tests = [s.path for s in test_samples(brick)[-3:]]
    first, second = (
        anomalens.create(name, image_size=64, seed=7, **CASES[case]).fit(images) for _ in range(2)
    )
    assert first.image_threshold_ == second.image_threshold_
    a, b, again = first.predict(tests), second.predict(tests), first.predict(tests)
    for x, y, z in zip(a, b, again, strict=True):
        assert x.score == y.score == z.score
        if x.anomaly_map is not None:
            np.testing.assert_array_equal(x.anomaly_map, y.anomaly_map)
            np.testing.assert_array_equal(x.anomaly_map, z.anomaly_map)
