"""Real datasets from ../shared/datasets (skipped with a reason where they are absent)."""

from __future__ import annotations

import pytest

from anomalens.data.mvtec import test_samples, training_images
from anomalens.evaluation.evaluator import fit_and_evaluate
from tests.conftest import shared_dataset

pytestmark = pytest.mark.slow  # started first by `make test` (tests/conftest.py)


def test_mvtec_reader_on_bottle() -> None:
    root = shared_dataset("mvtec_bottle_512")
    assert len(training_images(root)) == 209
    samples = test_samples(root)
    assert len(samples) == 83 and sum(s.label for s in samples) == 63
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in samples if s.label)


def test_patchcore_default_settings_on_bottle() -> None:
    """The accuracy bar of the core issue, at the default settings (lite0, 256 px, 1% coreset)."""
    root = shared_dataset("mvtec_bottle_512")
    _, evaluation = fit_and_evaluate("patchcore", root)
    metrics = evaluation.metrics
    assert metrics["image_auroc"] >= 0.998
    assert metrics["pixel_auroc"] >= 0.980
    assert metrics["aupro"] >= 0.93
