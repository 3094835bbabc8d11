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

    The keys: image_auroc, image_aupr, image_f1_max, pixel_auroc, aupro (fractions in [0, 1]),
    n_images, n_pixel_images and predict_ms_per_image (wall time of predict, image decoding
    included, divided by the number of images). The pixel metrics cover the normal images and the
    anomalous ones that have a mask (n_pixel_images of them); they are None for image-level
    detectors and for test splits without any defect mask.
    """
    samples = test_samples(root)
    started = time.perf_counter()
    predictions = detector.predict([sample.path for sample in samples])
    elapsed = time.perf_counter() - started
    labels = [sample.label for sample in samples]
    scores = [p.score for p in predictions]
    sample_masks: list[np.ndarray | None] = [None] * len(samples)
    masks: list[Any] | None = None
    maps: list[Any] | None = None
    if detector.produces_maps:
        sample_masks = [
            load_sample_mask(sample, p.anomaly_map.shape)
            for sample, p in zip(samples, predictions, strict=True)
        ]
        # Anomalous images without a mask file are left out of the pixel metrics (their map
        # goes in as None); with no anomalous mask at all there is nothing to localise.
        maps = [
            None if mask is None else p.anomaly_map
            for mask, p in zip(sample_masks, predictions, strict=True)
        ]
        masks = sample_masks
        if not any(label and m is not None for label, m in zip(labels, masks, strict=True)):
            masks = maps = None
    metrics: dict[str, Any] = evaluate_predictions(labels, scores, masks, maps)
    metrics["n_pixel_images"] = 0 if maps is None else sum(m is not None for m in maps)
    metrics["n_images"] = len(samples)
    metrics["predict_ms_per_image"] = 1000.0 * elapsed / len(samples)
    return Evaluation(metrics, samples, predictions, sample_masks)


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
