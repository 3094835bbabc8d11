"""Run a fitted detector over an MVTec-layout test split and compute its metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anomalens.core.detector import Detector
from anomalens.core.prediction import Prediction
from anomalens.core.registry import create
from anomalens.core.scorer import Scorer
from anomalens.data.mvtec import Sample, load_sample_mask, test_samples, training_images
from anomalens.evaluation.memory import PeakMemory
from anomalens.evaluation.metrics import evaluate_predictions


@dataclass
class Evaluation:
    """Metrics plus the samples and predictions they came from (for reports and overlays)."""

    metrics: dict[str, Any]
    samples: list[Sample]
    predictions: list[Prediction]
    masks: list[np.ndarray | None]
    """Per sample its ground truth at its map's size (None: normal, or no map or mask)."""


def evaluate(detector: Scorer, root: str | Path) -> Evaluation:
    """Predict every image of `root/test` and score it against labels and ground-truth masks.

    The keys: image_auroc, image_aupr, image_f1_max, pixel_auroc, aupro (fractions in [0, 1];
    pixel metrics None for image-level detectors), n_images, predict_ms_per_image (wall time of
    predict, image decoding included, divided by the number of images).
    """
    samples = test_samples(root)
    started = time.perf_counter()
    predictions = detector.predict([sample.path for sample in samples])
    elapsed = time.perf_counter() - started
    labels = [sample.label for sample in samples]
    scores = [p.score for p in predictions]
    metrics: dict[str, Any]
    masks: list[np.ndarray | None] = [None] * len(samples)
    if detector.produces_maps:
        masks = [
            load_sample_mask(sample, p.anomaly_map.shape)
            for sample, p in zip(samples, predictions, strict=True)
        ]
        usable = [i for i, mask in enumerate(masks) if mask is not None]
        metrics = evaluate_predictions(
            labels,
            scores,
            [masks[i] for i in usable],
            [predictions[i].anomaly_map for i in usable],
        )
    else:
        metrics = evaluate_predictions(labels, scores)
    metrics["n_images"] = len(samples)
    metrics["predict_ms_per_image"] = 1000.0 * elapsed / len(samples)
    return Evaluation(metrics, samples, predictions, masks)


def fit_and_evaluate(
    model: str, root: str | Path, train_every: int = 1, **params: Any
) -> tuple[Detector, Evaluation]:
    """Create `model`, fit it on `root`'s normal training images, evaluate on its test split.

    `train_every=n` fits on every n-th training image (by name) only, for quicker benchmarks on
    large sets; the test split is always complete. Adds fit_s, peak_rss_mb (process peak during
    fit and evaluation), model and n_train to the metrics.
    """
    detector = create(model, **params)
    images = training_images(root)[::train_every]
    with PeakMemory() as memory:
        started = time.perf_counter()
        detector.fit(images)
        fit_s = time.perf_counter() - started
        evaluation = evaluate(detector, root)
    evaluation.metrics.update(
        model=model, fit_s=fit_s, peak_rss_mb=memory.peak_mb, n_train=len(images)
    )
    return detector, evaluation
