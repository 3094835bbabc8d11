"""Model files: the tensors are the fitted state's state dict, checked key by key on load, and files
written before the layered package (format version 1) still load and score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import anomalens
from anomalens.core.model_file import read_config, read_model_file, write_model_file
from anomalens.errors import ModelFileError
from anomalens.state_dict import FittedState, stored_part

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


def test_a_fitted_state_dict_is_the_model_file_tensors() -> None:
    """Tensors under their names, lists numbered, networks' weights under a prefix; None left
    out; `stored_part` reads a tensor or a list back."""
    network = torch.nn.Linear(2, 1)
    parts = {"bank": torch.ones(3), "mean": [torch.zeros(1), torch.ones(2)], "network": network}
    tensors = FittedState({**parts, "absent": None}).state_dict()
    assert list(tensors) == ["bank", "mean.0", "mean.1", "network.weight", "network.bias"]
    assert torch.equal(stored_part("bank", tensors), parts["bank"])
    assert [t.shape for t in stored_part("mean", tensors)] == [(1,), (2,)]


def test_a_model_file_must_hold_every_tensor_of_its_model_and_no_other(tmp_path: Path) -> None:
    tensors, config = read_model_file(FIXTURES / "patchcore_v1.safetensors")
    for name, changed in [("extra", {**tensors, "unknown": torch.zeros(1)}), ("missing", {})]:
        path = write_model_file(tmp_path / f"{name}.safetensors", changed, config)
        with pytest.raises(ModelFileError, match="does not hold a valid patchcore model"):
            anomalens.load(path)
