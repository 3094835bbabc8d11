"""`intensity="standardize"`: each image's exposure normalised inside the feature extractor, so
that a brighter or dimmer normal image is still normal, a local defect is still found, and the
model file and its ONNX graph do the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

import anomalens
from anomalens.data.preprocessing import (
    LETTERBOX_FILL,
    STANDARD_MEAN,
    STANDARD_SPREAD,
    iter_batches,
    normalize_intensity,
)
from anomalens.deploy.export import export_onnx
from anomalens.errors import ParameterError
from anomalens.evaluation.selection import default_candidates

SIZE = 64


def texture(seed: int, gain: float = 1.0) -> np.ndarray:
    """A grey, smooth, slightly noisy texture (uint8 RGB), its brightness scaled by `gain`."""
    rng = np.random.default_rng(seed)
    low = ndimage.gaussian_filter(rng.normal(size=(SIZE, SIZE)), 3)
    gray = 0.4 + 0.06 * low / low.std() + 0.01 * rng.normal(size=(SIZE, SIZE))
    return (np.clip(gray * gain, 0, 1)[:, :, None].repeat(3, 2) * 255).round().astype(np.uint8)


def with_spot(image: np.ndarray) -> np.ndarray:
    """`image` with a black 16 x 16 square in the middle."""
    spotted = image.copy()
    spotted[22:38, 22:38] = 0
    return spotted


def test_standardize_removes_gain_and_offset_and_raw_is_identity() -> None:
    images = torch.rand(2, 3, 32, 32) * 0.3 + 0.2
    brighter = images * 1.8 + 0.1  # still inside [0, 1]
    standard = normalize_intensity(images, "standardize")
    torch.testing.assert_close(
        normalize_intensity(brighter, "standardize"), standard, atol=2e-3, rtol=0
    )
    means = standard.mean(dim=(1, 2, 3))
    spreads = standard.std(dim=(1, 2, 3), correction=0)
    torch.testing.assert_close(means, torch.full((2,), STANDARD_MEAN), atol=1e-3, rtol=0)
    torch.testing.assert_close(spreads, torch.full((2,), STANDARD_SPREAD), atol=2e-3, rtol=0)
    assert normalize_intensity(images, "raw") is images
    flat = torch.full((1, 3, 8, 8), 0.7)  # no spread at all: mid-grey, not a division by zero
    torch.testing.assert_close(normalize_intensity(flat, "standardize"), torch.full_like(flat, 0.5))


def test_letterbox_padding_is_left_out_of_the_statistics(tmp_path: Path) -> None:
    narrow = texture(0)[:, :32]  # 64 x 32, letterboxed into 64 x 64 with 16 px of fill a side
    brighter = texture(0, gain=1.8)[:, :32]
    batch = next(iter_batches([narrow, brighter], SIZE, 2, None, "letterbox"))
    top, left, height, width = batch.boxes[0]
    inside = np.s_[:, :, top : top + height, left : left + width]
    standard = normalize_intensity(batch.pixels, "standardize", letterboxed=True)
    means = standard[inside].mean(dim=(1, 2, 3))
    torch.testing.assert_close(means, torch.full((2,), STANDARD_MEAN), atol=1e-3, rtol=0)
    torch.testing.assert_close(standard[0], standard[1], atol=0.015, rtol=0)  # uint8 rounding
    assert (standard[:, :, :, :left] == LETTERBOX_FILL).all(), "the padding stays mid-grey"
    counted = normalize_intensity(batch.pixels, "standardize")  # the padding in the statistics
    assert (counted[inside].mean(dim=(1, 2, 3)) - STANDARD_MEAN).abs().max() > 0.02
    assert (counted[0] - counted[1]).abs().max() > 0.05

    model = anomalens.create(
        "patchcore", image_size=SIZE, resize="letterbox", intensity="standardize"
    ).fit([texture(seed)[:, :32] for seed in range(8)])
    scores = model.decision_function([narrow, brighter])
    assert scores[1] == pytest.approx(scores[0], rel=0.05)
    exported = anomalens.load(export_onnx(model, tmp_path / "patchcore.onnx"))
    np.testing.assert_allclose(exported.decision_function([narrow, brighter]), scores, rtol=1e-3)


@pytest.fixture(scope="module")
def fitted() -> dict[str, anomalens.Detector]:
    train = [texture(seed) for seed in range(20)]
    return {
        f"{model} {mode}": anomalens.create(
            model, image_size=SIZE, intensity=mode, validation_fraction=0.25
        ).fit(train)
        for model in ("patchcore", "padim")
        for mode in ("raw", "standardize")
    }


@pytest.mark.parametrize("model", ["patchcore", "padim"])
def test_a_brighter_normal_image_stays_normal_and_a_defect_is_found(fitted, model: str) -> None:
    normal, brighter = texture(100), texture(100, gain=1.8)
    images = [normal, brighter, with_spot(normal), with_spot(texture(101, gain=0.6))]
    raw, standard = fitted[f"{model} raw"], fitted[f"{model} standardize"]
    raw_scores, scores = raw.decision_function(images), standard.decision_function(images)
    assert raw_scores[0] < raw.image_threshold_ < raw_scores[1], "raw: brighter looks anomalous"
    assert max(scores[:2]) < standard.image_threshold_, "standardized: brighter is still normal"
    assert scores[1] == pytest.approx(scores[0], rel=0.05)
    assert min(scores[2:]) > 1.5 * standard.image_threshold_, "local defects are still found"


@pytest.mark.parametrize(
    ("model", "params"),
    [
        ("knn", {}),
        ("gaussian", {}),
        ("dfr", {"max_epochs": 1, "time_budget_s": None}),
        ("fastflow", {"flow_steps": 2, "max_epochs": 1, "time_budget_s": None}),
        ("cflow", {"flow_steps": 2, "max_epochs": 1, "time_budget_s": None}),
    ],
)
def test_every_feature_method_standardizes(model: str, params: dict, tmp_path: Path) -> None:
    train = [texture(seed) for seed in range(8)]
    detector = anomalens.create(
        model, image_size=SIZE, intensity="standardize", validation_fraction=0.25, **params
    ).fit(train)
    normal, brighter = texture(100), texture(100, gain=1.8)
    scores = detector.decision_function([normal, brighter])
    assert scores[1] == pytest.approx(scores[0], rel=0.05), "the same image, brighter"
    raw = anomalens.create(model, image_size=SIZE, validation_fraction=0.25, **params).fit(train)
    raw_scores = raw.decision_function([normal, brighter])
    assert abs(raw_scores[1] - raw_scores[0]) > 0.05 * abs(raw_scores[0])
    loaded = anomalens.load(detector.save(tmp_path / "model.safetensors"))
    assert loaded.intensity == "standardize"
    np.testing.assert_allclose(loaded.decision_function([brighter]), scores[1:], rtol=1e-5)


def test_persisted_and_exported_with_the_normalisation(fitted, tmp_path: Path) -> None:
    model = fitted["patchcore standardize"]
    images = [texture(200), texture(201, gain=1.5), with_spot(texture(202, gain=0.7))]
    loaded = anomalens.load(model.save(tmp_path / "model.safetensors"))
    assert loaded.intensity == "standardize"
    np.testing.assert_allclose(loaded.decision_function(images), model.decision_function(images))
    onnx = anomalens.load(export_onnx(model, tmp_path / "model.onnx"))
    np.testing.assert_allclose(
        onnx.decision_function(images), model.decision_function(images), rtol=1e-3
    )


def test_bad_intensity_is_a_parameter_error() -> None:
    with pytest.raises(
        ParameterError, match="intensity must be one of raw, standardize; got 'gamma'"
    ):
        anomalens.create("patchcore", image_size=SIZE, intensity="gamma").fit([texture(0)] * 2)


def test_auto_fit_tries_standardized_intensity() -> None:
    labels = [item.label for item in default_candidates()]
    assert "patchcore lite0 256 standardize" in labels and "padim lite0 256 standardize" in labels
