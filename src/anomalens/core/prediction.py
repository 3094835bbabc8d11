"""The per-image result every detector returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anomalens.components.regions import Region


@dataclass(frozen=True)
class Prediction:
    """Result for one image.

    score: anomaly score, higher = more anomalous.
    label: True when `score` exceeds the model's image threshold.
    anomaly_map: HxW float32 map at the input image's size (None for image-level methods).
    mask: HxW bool, `anomaly_map` above the model's pixel threshold (None when there is no map).
    regions: the mask's connected components, highest `max_score` first, for an image labelled
        anomalous that has a mask; () otherwise.
    """

    score: float
    label: bool
    anomaly_map: np.ndarray | None = None
    mask: np.ndarray | None = None
    regions: tuple[Region, ...] = ()
