"""CutPaste: the synthetic-defect augmentation and the self-supervised image-level detector."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import anomalens
from anomalens.cli import app
from anomalens.data.augment import cutpaste, cutpaste_scar
from anomalens.data.mvtec import test_samples, training_images
from anomalens.data.synthetic import normal_crop
from anomalens.errors import ParameterError
from anomalens.evaluation.metrics import image_auroc
from anomalens.features.backbones import Backbone

SMALL = {"image_size": 96, "batch_size": 4, "max_epochs": 3, "learning_rate": 3e-4}
"""A fit of a few seconds on the brick fixture (14 images; 4 steps per epoch)."""


def texture_batch(count: int, size: int = 128) -> torch.Tensor:
    rng = np.random.default_rng(0)
    crops = np.stack([normal_crop("brick", rng, size) for _ in range(count)])
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0


@pytest.mark.parametrize("defect", [cutpaste, cutpaste_scar])
def test_defects_change_one_region_and_follow_the_seed(defect) -> None:
    images = texture_batch(6)
    out, masks = defect(images, torch.Generator().manual_seed(3))
    assert out.shape == images.shape and masks.shape == (6, 128, 128)
    assert torch.equal(images, texture_batch(6)), "the input batch is left alone"
    changed = (out != images).any(dim=1)
    assert not (changed & ~masks).any(), "pixels outside the pasted region are untouched"
    for image_changed, mask in zip(changed, masks, strict=True):
        assert mask.any() and image_changed[mask].float().mean() > 0.5
    area = masks.float().mean(dim=(1, 2))
    if defect is cutpaste:  # 2-15 % of the image
        assert ((area > 0.015) & (area < 0.16)).all()
    else:  # a thin scar: at most 16 x 25 pixels of a 256-pixel image
        assert (area < 0.008).all()
    again, again_masks = defect(images, torch.Generator().manual_seed(3))
    assert torch.equal(out, again) and torch.equal(masks, again_masks)
    other, _ = defect(images, torch.Generator().manual_seed(4))
    assert not torch.equal(out, other)


def test_scar_is_rotated_and_long() -> None:
    images = texture_batch(8, size=256)
    _, masks = cutpaste_scar(images, torch.Generator().manual_seed(0))
    for mask in masks:
        rows, cols = torch.nonzero(mask, as_tuple=True)
        extent = max(int(rows.max() - rows.min()), int(cols.max() - cols.min())) + 1
        assert 7 <= extent <= 26 + 16 and mask.sum() <= 16 * 25 + 40
    tilted = [m for m in masks if not torch.equal(m, _bounding_box(m))]
    assert tilted, "scars are rotated, not all axis-aligned rectangles"


def _bounding_box(mask: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.nonzero(mask, as_tuple=True)
    box = torch.zeros_like(mask)
    box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    return box


@pytest.fixture(scope="module")
def fitted(brick: Path):
    return anomalens.create("cutpaste", **SMALL).fit(training_images(brick))


def test_separates_synthetic_defects_without_maps(fitted, brick: Path) -> None:
    samples = test_samples(brick)
    predictions = fitted.predict([s.path for s in samples])
    assert all(p.anomaly_map is None and p.mask is None for p in predictions)
    assert fitted.pixel_threshold_ is None
    assert image_auroc([s.label for s in samples], [p.score for p in predictions]) >= 0.9
    assert fitted.training_["cutpaste"]["epochs"] == 3


def test_save_load_round_trip_and_cli_predict(fitted, brick: Path, tmp_path: Path) -> None:
    images = [s.path for s in test_samples(brick)]
    path = fitted.save(tmp_path / "cutpaste.safetensors")
    loaded = anomalens.load(path)
    scores = fitted.decision_function(images)
    np.testing.assert_array_equal(loaded.decision_function(images), scores)
    assert loaded.image_threshold_ == fitted.image_threshold_
    # The head and classifier are in the file too.
    assert loaded.classification_accuracy(images) == fitted.classification_accuracy(images)
    out = tmp_path / "pred"
    result = CliRunner().invoke(
        app, ["predict", str(path), str(brick / "test" / "good"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").read_text(encoding="utf-8").splitlines()))
    assert len(rows) == 6 and not (out / "overlays").exists()
    expected = fitted.decision_function([row["path"] for row in rows])
    assert [float(row["score"]) for row in rows] == pytest.approx(expected.tolist(), rel=1e-5)


def test_early_stages_stay_pretrained(fitted) -> None:
    before = Backbone(layers=fitted.network_.backbone.layers).network.state_dict()
    trained = fitted.network_.backbone.network.state_dict()
    # The stem and the stride <= 8 stages are frozen; batch-norm statistics stay ImageNet's.
    for same in ("conv_stem.weight", "blocks.2.0.conv_pw.weight", "blocks.6.0.bn1.running_mean"):
        assert torch.equal(trained[same], before[same]), same
    tuned = "blocks.6.0.conv_pw.weight"
    assert not torch.equal(trained[tuned], before[tuned])


def test_bad_parameters_are_clear_errors(brick: Path) -> None:
    images = training_images(brick)[:4]
    with pytest.raises(ParameterError, match="variant"):
        anomalens.create("cutpaste", variant="4way").fit(images)
    with pytest.raises(ParameterError, match="freeze_stride"):
        anomalens.create("cutpaste", freeze_stride=-1).fit(images)
    with pytest.raises(ParameterError, match="handcrafted"):
        anomalens.create("cutpaste", backbone="handcrafted").fit(images)
