"""PaDiM on the synthetic data: detection, localisation, grid and memory, persistence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import anomalens
from anomalens.data.mvtec import load_sample_mask, test_samples, training_images
from anomalens.evaluation.evaluator import evaluate


@pytest.fixture(scope="module")
def fitted_padim(brick: Path):
    return anomalens.create("padim", image_size=128).fit(training_images(brick))


def test_padim_detects_and_localises(fitted_padim, brick: Path) -> None:
    metrics = evaluate(fitted_padim, brick).metrics
    assert metrics["image_auroc"] >= 0.9
    assert metrics["pixel_auroc"] >= 0.9
    sample = next(s for s in test_samples(brick) if s.label)
    (prediction,) = fitted_padim.predict([sample.path])
    mask = load_sample_mask(sample, (128, 128))
    assert prediction.anomaly_map.shape == (128, 128)
    assert prediction.anomaly_map[mask].mean() > prediction.anomaly_map[~mask].mean()


def test_padim_fitted_state(fitted_padim) -> None:
    model = fitted_padim
    assert model.layers_ == ["blocks.1", "blocks.2", "blocks.4"]
    assert model.channels_.numel() == 100 and len(set(model.channels_.tolist())) == 100
    assert int(model.channels_.max()) < 24 + 40 + 112
    positions = (128 // 8) ** 2  # default feature_stride 8
    assert tuple(model.mean_.shape) == (positions, 100)
    assert tuple(model.precision_.shape) == (positions, 100, 100)
    precision = model.precision_[0].double()
    torch.testing.assert_close(precision, precision.T, rtol=1e-4, atol=1e-4)
    assert torch.linalg.eigvalsh(precision).min() > 0, "precision must be positive definite"


def test_padim_finest_grid_and_small_feature_sets(brick: Path) -> None:
    images = training_images(brick)[:8]
    model = anomalens.create(
        "padim", image_size=64, feature_stride=None, n_features=500, validation_fraction=0.25
    ).fit(images)
    assert tuple(model.mean_.shape) == ((64 // 4) ** 2, 176)  # all channels when d > total
    with pytest.raises(ValueError, match="n_features"):
        anomalens.create("padim", n_features=0).fit(images)


@pytest.mark.parametrize("model", ["padim", "patchcore"])
def test_handcrafted_backbone_detects(model: str, brick: Path, tmp_path: Path) -> None:
    detector = anomalens.create(model, backbone="handcrafted", image_size=128)
    detector.fit(training_images(brick))
    metrics = evaluate(detector, brick).metrics
    assert metrics["image_auroc"] >= 0.75 and metrics["pixel_auroc"] >= 0.75
    loaded = anomalens.load(detector.save(tmp_path / "hc.safetensors"))
    image = test_samples(brick)[-1].path
    assert loaded.predict([image])[0].score == detector.predict([image])[0].score
