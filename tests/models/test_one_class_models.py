"""Image-level one-class detectors: rotnet, deepsvdd, ocsvm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import anomalens
from anomalens.data.labelled import load_labelled, one_class_split
from anomalens.data.synthetic import normal_crop
from anomalens.evaluation.metrics import image_auroc
from anomalens.models.rotnet import apply_transformation, fit_dirichlet, transformations
from tests.conftest import shared_dataset

SIZE = 32


def glyphs(kind: str, count: int, seed: int) -> list[np.ndarray]:
    """Bright shapes on black, SIZE px: "L" (no symmetry), "T" (mirror symmetric), "ring"
    (centred rings: every rotation and flip leaves them unchanged)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    images = []
    for _ in range(count):
        image = np.zeros((SIZE, SIZE))
        if kind == "ring":
            radius, width = rng.uniform(5, 13), rng.uniform(1.5, 3)
            image[np.abs(np.hypot(x, y) - radius) < width / 2] = 1
        else:
            top, left = rng.integers(5, 9, size=2)
            length, thick = rng.integers(16, 21), rng.integers(3, 5)
            if kind == "L":
                image[top : top + length, left : left + thick] = 1
                image[top + length - thick : top + length, left : left + length - 4] = 1
            else:
                image[top : top + thick, left : left + length] = 1
                middle = left + length // 2 - thick // 2
                image[top : top + length, middle : middle + thick] = 1
        image = image * rng.uniform(0.7, 1.0) + rng.normal(0, 0.03, image.shape)
        images.append(np.clip(image, 0, 1).astype(np.float32))
    return images


def auroc(model, normal: list, anomalous: list) -> float:
    scores = model.decision_function(normal + anomalous)
    return image_auroc([0] * len(normal) + [1] * len(anomalous), scores)


def textures(name: str, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [normal_crop(name, rng, 64) for _ in range(count)]


# ---- rotnet ------------------------------------------------------------------------------------
def test_transformations_are_the_papers() -> None:
    assert len(transformations(4, True, 0.25)) == 72
    assert transformations(4, True, 0.0)[0] == (0, 0, 0, 0)
    assert len(set(transformations(4, True, 0.0))) == 8
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(apply_transformation(image, (0, 0, 0, 1), 1), torch.rot90(image, 1, (2, 3)))
    assert torch.equal(apply_transformation(image, (1, 0, 0, 0), 1), image.flip(-1))
    shifted = apply_transformation(image, (0, 1, 0, 0), 1)  # one pixel right, reflected in
    assert torch.equal(shifted[..., 1:], image[..., :-1])
    assert torch.equal(shifted[..., 0], image[..., 1])


def test_dirichlet_fit_recovers_parameters() -> None:
    alpha = np.array([8.0, 2.0, 0.5])
    samples = np.random.default_rng(0).dirichlet(alpha, 4000)
    assert np.allclose(fit_dirichlet(samples), alpha, rtol=0.08)


def small_rotnet(**params) -> anomalens.models.Detector:
    return anomalens.create(
        "rotnet", **{"image_size": SIZE, "max_epochs": 10, "batch_size": 8, **params}
    )


@pytest.fixture(scope="module")
def rotnet_on_l() -> anomalens.models.Detector:
    return small_rotnet().fit(glyphs("L", 40, seed=0))


def test_rotnet_flags_shapes_it_cannot_orient(rotnet_on_l) -> None:
    normal = glyphs("L", 20, seed=1)
    assert rotnet_on_l.recognition_accuracy(normal) >= 0.9
    assert auroc(rotnet_on_l, normal, glyphs("ring", 20, seed=2)) >= 0.95
    assert rotnet_on_l.predict(normal[:1])[0].anomaly_map is None


def test_rotnet_fails_on_rotation_symmetric_objects() -> None:
    """The documented weakness: on centred rings every transformation looks the same, so the
    network cannot learn the task (chance is 1/8) and has nothing to compare test images with."""
    rings = small_rotnet(max_epochs=5).fit(glyphs("ring", 30, seed=0))
    assert rings.recognition_accuracy(glyphs("ring", 20, seed=1)) <= 0.25


def test_rotnet_simple_score_and_bad_params(rotnet_on_l) -> None:
    rotnet_on_l.score = "simple"
    try:
        assert auroc(rotnet_on_l, glyphs("L", 20, seed=1), glyphs("ring", 20, seed=2)) >= 0.95
    finally:
        rotnet_on_l.score = "dirichlet"
    with pytest.raises(ValueError, match="rotations"):
        anomalens.create("rotnet", rotations=3).fit(glyphs("L", 4, seed=0))
    with pytest.raises(ValueError, match="at least two"):
        anomalens.create("rotnet", rotations=1, flips=False).fit(glyphs("L", 4, seed=0))


def test_rotnet_on_fashion_mnist_ranks_other_classes_higher() -> None:
    train = load_labelled(shared_dataset("fashion_mnist"))
    test = load_labelled(shared_dataset("fashion_mnist"), "test")
    images, test_images, labels = one_class_split(train, test, 0, max_train=120)
    keep = np.r_[np.flatnonzero(labels == 0)[:60], np.flatnonzero(labels == 1)[:60]]
    model = small_rotnet(max_epochs=3, batch_size=16)
    scores = model.fit(list(images)).decision_function(list(test_images[keep]))
    assert image_auroc(labels[keep], scores) >= 0.8


# ---- deepsvdd ----------------------------------------------------------------------------------
def test_deepsvdd_from_scratch_learns_a_compact_description(tmp_path: Path) -> None:
    model = anomalens.create("deepsvdd", image_size=SIZE, max_epochs=10, batch_size=8)
    model.fit(glyphs("L", 40, seed=0))
    losses = model.training_["deepsvdd"]["losses"]
    assert losses[-1] < 0.5 * losses[0]
    assert not any(name.endswith("bias") for name in model.network_.state_dict())
    normal = glyphs("L", 20, seed=1)
    assert auroc(model, normal, glyphs("ring", 10, seed=2) + glyphs("T", 10, seed=3)) >= 0.9
    loaded = anomalens.load(model.save(tmp_path / "svdd.safetensors"))
    assert np.allclose(loaded.decision_function(normal), model.decision_function(normal))
    assert loaded.training_ == model.training_ and model.training_["deepsvdd"]["epochs"] == 10


def test_deepsvdd_pretrained_separates_textures(tmp_path: Path) -> None:
    model = anomalens.create("deepsvdd", pretrained=True, image_size=64, max_epochs=10)
    model.fit(textures("brick", 30, seed=0))
    normal = textures("brick", 10, seed=1)
    assert auroc(model, normal, textures("gravel", 5, seed=2) + textures("grass", 5, seed=3)) > 0.95
    loaded = anomalens.load(model.save(tmp_path / "svdd.safetensors"))
    assert np.allclose(loaded.decision_function(normal), model.decision_function(normal))


# ---- ocsvm -------------------------------------------------------------------------------------
def test_ocsvm_separates_textures_and_round_trips(tmp_path: Path) -> None:
    model = anomalens.create("ocsvm", image_size=64)
    model.fit(textures("brick", 30, seed=0))
    assert model.layers_ == ["blocks.4", "blocks.6"]
    assert 0 < len(model.support_vectors_) <= 27 and model.gamma_ > 0
    normal = textures("brick", 10, seed=1)
    assert auroc(model, normal, textures("gravel", 5, seed=2) + textures("grass", 5, seed=3)) > 0.95
    path = model.save(tmp_path / "ocsvm.safetensors")
    loaded = anomalens.load(path)
    assert loaded.gamma_ == model.gamma_
    assert np.allclose(loaded.decision_function(normal), model.decision_function(normal))
    with pytest.raises(ValueError, match="gamma"):
        anomalens.create("ocsvm", image_size=64, gamma="wide").fit(normal)


def test_ocsvm_scores_match_scikit_learn() -> None:
    """Our torch scoring of the stored support vectors is scikit-learn's score_samples."""
    from sklearn.svm import OneClassSVM

    from anomalens.features.patches import pooled_dataset_features

    train = textures("brick", 20, seed=0)
    model = anomalens.create("ocsvm", image_size=64, gamma="scale", validation_fraction=0.1)
    model.fit(train)
    normal = textures("brick", 6, seed=1)
    features = pooled_dataset_features(model.backbone_, normal, 64, 8).numpy()
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    svm = OneClassSVM(gamma=model.gamma_, nu=model.nu)
    svm.support_vectors_ = model.support_vectors_.numpy().astype(np.float64)
    reference = np.exp(
        -model.gamma_ * ((features[:, None] - svm.support_vectors_[None]) ** 2).sum(-1)
    ) @ model.dual_coef_.numpy().astype(np.float64)
    assert np.allclose(model.decision_function(normal), -reference, rtol=1e-4)


# ---- command line ------------------------------------------------------------------------------
def test_image_level_model_on_the_command_line(brick: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from anomalens.cli import app

    runner = CliRunner()
    model = tmp_path / "ocsvm.safetensors"
    fitted = runner.invoke(
        app, ["fit", str(brick), "-o", str(model), "--model", "ocsvm", "--image-size", "64"]
    )
    assert fitted.exit_code == 0, fitted.output
    out = tmp_path / "predicted"
    good = brick / "test" / "good"
    predicted = runner.invoke(app, ["predict", str(model), str(good), "--out", str(out)])
    assert predicted.exit_code == 0, predicted.output
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(list(good.iterdir())) and not (out / "overlays").exists()
    report = tmp_path / "report"
    evaluated = runner.invoke(app, ["evaluate", str(model), str(brick), "--out", str(report)])
    assert evaluated.exit_code == 0, evaluated.output
    assert (report / "index.html").is_file() and "n/a" in evaluated.output
