"""`evaluate` on test splits whose defect images have no (or only some) ground-truth masks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from anomalens.cli import app
from anomalens.data.mvtec import load_sample_mask, test_samples
from anomalens.evaluation import evaluate
from anomalens.evaluation.metrics import pixel_auroc

IMAGE_KEYS = ("image_auroc", "image_aupr", "image_f1_max")


@pytest.fixture(scope="module")
def reference(fitted_patchcore, brick: Path) -> dict:
    """Metrics of the fitted PatchCore on the complete brick split (all masks present)."""
    return evaluate(fitted_patchcore, brick).metrics


def _copy_without(brick: Path, target: Path, ignore: str) -> Path:
    return Path(shutil.copytree(brick, target, ignore=shutil.ignore_patterns(ignore)))


def test_no_masks_gives_image_metrics_and_no_pixel_metrics(
    fitted_patchcore, brick, reference, tmp_path
) -> None:
    root = _copy_without(brick, tmp_path / "labels_only", "ground_truth")
    metrics = evaluate(fitted_patchcore, root).metrics
    assert reference["pixel_auroc"] is not None
    for key in IMAGE_KEYS:
        assert metrics[key] == pytest.approx(reference[key])
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert metrics["n_images"] == 14 and metrics["n_pixel_images"] == 0
    assert reference["n_pixel_images"] == 14


def test_some_masks_gives_pixel_metrics_over_the_masked_images(
    fitted_patchcore, brick, tmp_path
) -> None:
    root = Path(shutil.copytree(brick, tmp_path / "some_masks"))
    masks = sorted((root / "ground_truth").rglob("*_mask.png"))
    for mask in masks[: len(masks) // 2]:
        mask.unlink()
    evaluation = evaluate(fitted_patchcore, root)
    kept = [
        (load_sample_mask(s, p.anomaly_map.shape), p.anomaly_map)
        for s, p in zip(evaluation.samples, evaluation.predictions, strict=True)
        if s.label == 0 or s.mask_path is not None
    ]
    assert len(kept) == evaluation.metrics["n_pixel_images"] == 14 - len(masks) // 2
    expected = pixel_auroc([m for m, _ in kept], [a for _, a in kept])
    assert evaluation.metrics["pixel_auroc"] == pytest.approx(expected)
    assert evaluation.metrics["aupro"] is not None


def test_cli_evaluate_without_masks(fitted_patchcore, brick, tmp_path) -> None:
    root = _copy_without(brick, tmp_path / "labels_only", "ground_truth")
    assert all(s.mask_path is None for s in test_samples(root) if s.label)
    model = fitted_patchcore.save(tmp_path / "model.safetensors")
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(app, ["evaluate", str(model), str(root), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "n/a" in result.output
    metrics = json.loads(out.read_text())
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert 0.5 < metrics["image_auroc"] <= 1.0
