"""Image-level density methods (gaussian, knn): scores without maps, through library and CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import anomalens
from anomalens.cli import app
from anomalens.data.mvtec import test_samples, training_images
from anomalens.evaluation.evaluator import evaluate


@pytest.fixture(scope="module", params=["gaussian", "knn"])
def fitted(request, brick: Path):
    return anomalens.create(request.param, image_size=128).fit(training_images(brick))


def test_detects_without_maps(fitted, brick: Path, tmp_path: Path) -> None:
    metrics = evaluate(fitted, brick).metrics
    assert metrics["image_auroc"] >= 0.85
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None
    prediction = fitted.predict([test_samples(brick)[0].path])[0]
    assert prediction.anomaly_map is None and prediction.mask is None
    assert fitted.pixel_threshold_ is None
    loaded = anomalens.load(fitted.save(tmp_path / "m.safetensors"))
    images = [s.path for s in test_samples(brick)]
    np.testing.assert_array_equal(
        fitted.decision_function(images), loaded.decision_function(images)
    )


def test_gaussian_fits_one_shrunk_gaussian_per_level(brick: Path) -> None:
    model = anomalens.create("gaussian", image_size=64).fit(training_images(brick))
    assert model.layers_ == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    assert [tuple(p.shape) for p in model.precision_] == [(c, c) for c in (16, 24, 40, 112, 320)]
    # 14 images, 320 channels: the sample covariance is singular, the shrunk one is not.
    assert np.isfinite(model.precision_[-1].numpy()).all()


def test_knn_score_is_mean_distance_to_k_nearest(brick: Path) -> None:
    model = anomalens.create("knn", image_size=64, k=3).fit(training_images(brick))
    image = test_samples(brick)[-1].path
    (score,) = model.decision_function([image])
    from anomalens.data.preprocessing import iter_batches
    from anomalens.features.patches import pooled_features

    (batch,) = list(iter_batches([image], 64, 1))
    with torch.inference_mode():
        vector = pooled_features(model.backbone_(batch.pixels)).numpy()[0]
    distances = np.sort(np.linalg.norm(model.features_.numpy() - vector, axis=1))
    assert score == pytest.approx(distances[:3].mean(), rel=1e-4)


def test_cli_fit_predict_evaluate_image_level(brick: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    model = tmp_path / "knn.safetensors"
    args = ["fit", str(brick), "-o", str(model), "--model", "knn", "--image-size", "64"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "pred"
    result = runner.invoke(
        app, ["predict", str(model), str(brick / "test" / "good"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").read_text(encoding="utf-8").splitlines()))
    assert len(rows) == 6 and all(row["score"] for row in rows)
    assert not (out / "overlays").exists(), "no heatmap without an anomaly map"
    report = tmp_path / "report"
    metrics_file = tmp_path / "metrics.json"
    result = runner.invoke(
        app, ["evaluate", str(model), str(brick), "--json", str(metrics_file), "--out", str(report)]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(metrics_file.read_text())
    assert metrics["pixel_auroc"] is None and metrics["image_auroc"] > 0.8
    assert (report / "index.html").is_file()
