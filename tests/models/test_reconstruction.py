"""Reconstruction detectors (autoencoder, vae, fanogan, dfr) and their shared parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import anomalens
from anomalens.components.networks import make_augmentation
from anomalens.components.residuals import image_scores, residual_map, ssim
from anomalens.data.mvtec import load_sample_mask, test_samples, training_images
from anomalens.data.synthetic import add_defect
from anomalens.errors import ParameterError
from anomalens.evaluation.metrics import image_auroc

pytestmark = pytest.mark.slow  # started first by `make test` (tests/conftest.py)

SIZE = 32


def smooth_images(count: int, seed: int) -> list[np.ndarray]:
    """Normal images of a simple family: colour gradients at a random angle and brightness."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    images = []
    for _ in range(count):
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * x + np.sin(angle) * y
        base = rng.uniform(0.35, 0.65, size=3)
        image = base + 0.25 * (ramp[:, :, None] - 0.5) * rng.uniform(0.5, 1.0, size=3)
        images.append(np.clip(image * 255, 0, 255).astype(np.uint8))
    return images


# ---- shared parts ----------------------------------------------------------------------------
def test_residual_maps_are_zero_for_a_perfect_reconstruction_and_peak_at_a_change() -> None:
    torch.manual_seed(0)
    image = torch.rand(1, 3, 24, 24)
    changed = image.clone()
    changed[:, :, 10:14, 10:14] = 1 - changed[:, :, 10:14, 10:14]
    for kind in ("l1", "l2", "ssim"):
        assert residual_map(image, image, kind).abs().max() < 1e-4
        residual = residual_map(image, changed, kind)[0, 0]
        assert residual.shape == (24, 24)
        peak = divmod(int(residual.argmax()), 24)
        assert 8 <= peak[0] <= 15 and 8 <= peak[1] <= 15, kind
    assert torch.allclose(ssim(image, image), torch.ones(1, 1, 24, 24), atol=1e-4)
    with pytest.raises(ParameterError, match="residual"):
        residual_map(image, image, "l3")


def test_image_scores_max_and_top_k() -> None:
    maps = torch.zeros(2, 10, 10)
    maps[0, 0, :5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    maps[1, 3, 3] = 2.0
    assert image_scores(maps, "max").tolist() == [5.0, 2.0]
    assert image_scores(maps, "top_k", top_k=0.03).tolist() == pytest.approx([4.0, 2.0 / 3])
    with pytest.raises(ParameterError, match="top_k"):
        image_scores(maps, "top_k", top_k=0)


def test_augmentation_is_opt_in_seeded_and_keeps_images_in_range() -> None:
    assert make_augmentation("none") is None and make_augmentation("") is None
    with pytest.raises(ParameterError, match="'twist'"):
        make_augmentation("shift,twist")
    augment = make_augmentation("shift,brightness,hflip,vflip,rot90")
    batch = torch.rand(4, 3, 20, 20)
    first = augment(batch, torch.Generator().manual_seed(1))
    second = augment(batch, torch.Generator().manual_seed(1))
    assert torch.equal(first, second) and first.shape == batch.shape
    assert not torch.equal(first, batch)
    assert first.min() >= 0 and first.max() <= 1


# ---- the pixel autoencoder ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_autoencoder():
    model = anomalens.create(
        "autoencoder",
        image_size=SIZE,
        latent_dim=16,
        width=16,
        residual="l2",
        smoothing_sigma=1.0,
        augment="none",
        max_epochs=30,
        patience=30,
        time_budget_s=None,
        batch_size=16,
    )
    return model.fit(smooth_images(48, seed=0))


def test_tiny_autoencoder_detects_and_localises_a_defect(tiny_autoencoder) -> None:
    normals = smooth_images(8, seed=1)
    rng = np.random.default_rng(2)
    defects = [add_defect(image, "hole", rng) for image in smooth_images(4, seed=3)]
    predictions = tiny_autoencoder.predict(normals + [image for image, _ in defects])
    normal_scores = [p.score for p in predictions[: len(normals)]]
    for prediction, (_, mask) in zip(predictions[len(normals) :], defects, strict=True):
        assert prediction.score > max(normal_scores)
        peak = np.unravel_index(np.argmax(prediction.anomaly_map), mask.shape)
        assert mask[peak], f"residual peak {peak} outside the defect"


def test_same_seed_same_model_with_augmentation() -> None:
    images, probe = smooth_images(16, seed=0), smooth_images(3, seed=7)
    scores = []
    for seed in (0, 0, 1):
        model = anomalens.create(
            "autoencoder",
            image_size=SIZE,
            latent_dim=8,
            width=8,
            augment="shift,brightness,hflip",
            max_epochs=3,
            seed=seed,
        )
        scores.append(model.fit(images).decision_function(probe))
    assert np.array_equal(scores[0], scores[1])
    assert not np.array_equal(scores[0], scores[2])


def test_bad_parameter_values_are_clear_errors() -> None:
    images = smooth_images(4, seed=0)
    with pytest.raises(ParameterError, match="residual must be one of l1, l2, ssim"):
        anomalens.create("autoencoder", image_size=SIZE, residual="abs").fit(images)
    with pytest.raises(ParameterError, match="image_size 36 must be divisible by 8"):
        anomalens.create("autoencoder", image_size=36).fit(images)
    with pytest.raises(ParameterError, match="image_score"):
        anomalens.create("vae", image_size=SIZE, image_score="nll").fit(images)
    with pytest.raises(ParameterError, match="max_epochs"):
        anomalens.create("fanogan", image_size=SIZE, max_epochs=0).fit(images)


# ---- vae and f-AnoGAN: train, score, save ------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("vae", {"image_score": "elbo", "latent_dim": 8}),
        ("vae", {"image_score": "reconstruction", "latent_dim": 8, "residual": "l1"}),
        ("fanogan", {"latent_dim": 8, "encoder_epochs": 2, "n_critic": 2}),
    ],
)
def test_generative_models_fit_score_and_round_trip(name, params, tmp_path: Path) -> None:
    model = anomalens.create(
        name, image_size=SIZE, width=8, max_epochs=2, augment="shift", batch_size=8, **params
    )
    model.fit(smooth_images(16, seed=0))
    images = smooth_images(3, seed=4)
    predictions = model.predict(images)
    assert all(np.isfinite(p.score) for p in predictions)
    assert predictions[0].anomaly_map.shape == (SIZE, SIZE)
    loaded = anomalens.load(model.save(tmp_path / "model.safetensors"))
    assert np.array_equal(loaded.decision_function(images), model.decision_function(images))


def test_vae_negative_elbo_includes_the_kl_term() -> None:
    model = anomalens.create("vae", image_size=SIZE, width=8, latent_dim=8, max_epochs=2)
    model.fit(smooth_images(16, seed=0))
    images = smooth_images(4, seed=6)
    elbo = model.decision_function(images)
    model.image_score = "reconstruction"
    reconstruction = model.decision_function(images)
    assert np.all(elbo > reconstruction)


# ---- feature reconstruction --------------------------------------------------------------------
def test_dfr_detects_and_localises_synthetic_defects(brick: Path, tmp_path: Path) -> None:
    model = anomalens.create("dfr", image_size=128, max_epochs=15, time_budget_s=None)
    model.fit(training_images(brick))
    assert 1 <= model.latent_channels_ < len(model.feature_mean_)
    samples = test_samples(brick)
    predictions = model.predict([s.path for s in samples])
    labels = [s.label for s in samples]
    assert image_auroc(labels, [p.score for p in predictions]) >= 0.9
    inside = 0
    for sample, prediction in zip(samples, predictions, strict=True):
        if sample.label:
            mask = load_sample_mask(sample, prediction.anomaly_map.shape)
            peak = np.unravel_index(np.argmax(prediction.anomaly_map), mask.shape)
            near = np.zeros_like(mask)
            near[max(0, peak[0] - 6) : peak[0] + 7, max(0, peak[1] - 6) : peak[1] + 7] = True
            inside += bool((near & mask).any())
    assert inside >= 0.75 * sum(labels)
    loaded = anomalens.load(model.save(tmp_path / "dfr.safetensors"))
    paths = [s.path for s in samples[:4]]
    assert np.array_equal(loaded.decision_function(paths), model.decision_function(paths))
    assert loaded.latent_channels_ == model.latent_channels_
