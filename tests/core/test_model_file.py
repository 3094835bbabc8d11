"""Model files written before the layered package (format version 1) still load and score."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import anomalens
from anomalens.core.model_file import read_config

FIXTURES = Path(__file__).parent / "fixtures"


def test_a_version_1_file_written_by_the_old_code_loads_and_scores_the_same() -> None:
    """`patchcore_v1.safetensors` was written by anomalens before the redesign (handcrafted
    PatchCore on six 32-px noise images, input 64 px); the scores are what that code gave."""
    path = FIXTURES / "patchcore_v1.safetensors"
    assert read_config(path)["format_version"] == 1
    model = anomalens.load(path)
    images = list(np.load(FIXTURES / "patchcore_v1_images.npy"))
    expected = np.load(FIXTURES / "patchcore_v1_scores.npy")
    np.testing.assert_allclose(model.decision_function(images), expected, rtol=1e-5)
    assert model.predict(images)[2].label
