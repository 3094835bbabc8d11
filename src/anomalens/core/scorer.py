"""What a fitted model does, however it computes its scores: thresholds, `predict`,
`decision_function`, `predict_batch` and the batching around them.

`Detector` (the torch models, which also learn) and `OnnxModel` (an ONNX export run by ONNX
Runtime) are both scorers: images are loaded, resized and batched by the same code, and labels
and masks come from the same thresholds. A scorer implements `_score_batch` and sets `name`,
`produces_maps`, `image_size`, `batch_size` and the thresholds (`restore_thresholds`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Self

import numpy as np
import torch

from anomalens.components.maps import resize_maps
from anomalens.components.regions import check_min_area, find_regions
from anomalens.core.prediction import Prediction
from anomalens.core.thresholds import f1_optimal_threshold, pixel_f1_optimal_threshold
from anomalens.data.io import decode_mask, encode_mask, stretch_mask
from anomalens.data.preprocessing import Batch, ImageLike, iter_batches
from anomalens.errors import DataError, NotFittedError


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` in the calling thread (OpenMP keeps the setting
    per thread) for the block, then put back; None leaves them alone."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


MapSink = Callable[[list[np.ndarray | None]], None]
"""Takes the maps of each batch as they are scored (`Scorer._score_all`)."""


class Scorer:
    """Scores, labels, anomaly maps and masks from a fitted model (the inference half of the
    detector contract)."""

    name: str
    produces_maps: bool
    image_size: int
    batch_size: int
    roi_: np.ndarray | None = None
    """Region of interest (bool HxW, stretched to each image), or None: see `Detector.fit`."""
    validation_scores_: np.ndarray | None = None
    """The held-out normal images' scores the thresholds were set on (None in model files written
    before they were kept): the reference a service compares its recent scores with (drift)."""
    torch_threads: int | None = None
    """Threads torch may use for the resizing around this scorer's compute (None: as set). A
    scorer whose compute runs on threads of its own (ONNX Runtime's) says 1: after each resize,
    torch's idle OpenMP workers spin for a while and take the cores from it (int8 PatchCore's
    `predict` of one 256 px image: 12% faster with 1; no change for batches of 512 px images,
    benchmarks/RESULTS.md). Set per calling thread, and for the thread that decodes ahead, for
    the duration of a call."""

    # ---- thresholds ------------------------------------------------------------------------
    def calibrate(
        self,
        images: Sequence[ImageLike],
        labels: Sequence[int],
        masks: Sequence[np.ndarray | None] | None = None,
    ) -> Self:
        """Set F1-optimal thresholds from an explicit labelled calibration set (never the test set).

        `labels`: 1 = anomalous; `masks`: per image a bool HxW ground truth at the image's size,
        or None; pixel calibration uses the images that have one.
        """
        self._check_fitted()
        images = list(images)
        if len(labels) != len(images):
            raise DataError(f"calibrate got {len(images)} images but {len(labels)} labels")
        scores, maps = self._score_all(images, "calibrating", full_size=True)
        self.image_threshold_, _ = f1_optimal_threshold(np.asarray(labels), scores)
        if self.produces_maps and masks is not None:
            pairs = [(m, a) for m, a in zip(masks, maps, strict=True) if m is not None]
            if pairs:
                self.pixel_threshold_, _ = pixel_f1_optimal_threshold(
                    [m for m, _ in pairs], [a for _, a in pairs]
                )
        self.threshold_source_ = "calibration"
        return self

    def threshold_config(self) -> dict[str, Any]:
        """The thresholds and where they came from, as a model file's fitted config keeps them."""
        return {
            "image_threshold": self.image_threshold_,
            "pixel_threshold": self.pixel_threshold_,
            "n_train_images": self.n_train_images_,
            "n_validation_images": self.n_validation_images_,
            "threshold_source": self.threshold_source_,
            "roi": None if self.roi_ is None else encode_mask(self.roi_),
            "validation_scores": None
            if self.validation_scores_ is None
            else [float(score) for score in self.validation_scores_],
        }

    def restore_thresholds(self, fitted: dict[str, Any]) -> None:
        """Set the thresholds from a model file's (or an ONNX export's) fitted config."""
        self.image_threshold_ = float(fitted["image_threshold"])
        pixel = fitted.get("pixel_threshold")
        self.pixel_threshold_ = None if pixel is None else float(pixel)
        self.n_train_images_ = int(fitted["n_train_images"])
        self.n_validation_images_ = int(fitted["n_validation_images"])
        self.threshold_source_ = str(fitted["threshold_source"])
        self.roi_ = None if fitted.get("roi") is None else decode_mask(fitted["roi"])
        scores = fitted.get("validation_scores")
        self.validation_scores_ = None if scores is None else np.asarray(scores, dtype=np.float64)

    # ---- inference -------------------------------------------------------------------------
    def predict(self, images: Sequence[ImageLike], *, min_region_area: int = 0) -> list[Prediction]:
        """Score, label, anomaly map (HxW at the image's own size), mask and, for an image labelled
        anomalous, the mask's regions of at least `min_region_area` pixels, for every image."""
        min_region_area = check_min_area(min_region_area, "min_region_area")
        self._check_fitted()
        scores, maps = self._score_all(list(images), "predicting", full_size=True)
        return [
            self._prediction(score, m, min_region_area)
            for score, m in zip(scores, maps, strict=True)
        ]

    def decision_function(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Anomaly scores only (higher = more anomalous), like PyOD's `decision_function`."""
        self._check_fitted()
        return self._score_all(list(images), "scoring")[0]

    def predict_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores (B,) and maps (B, S, S) for an already resized (B, 3, S, S) tensor in [0, 1]."""
        self._check_fitted()
        with torch.inference_mode(), torch_threads(self.torch_threads):
            scores, maps = self._score_batch(pixels)
        self._apply_roi(scores, maps, [(0, 0, *pixels.shape[-2:])] * len(scores))
        return scores, maps

    def _prediction(
        self, score: float, anomaly_map: np.ndarray | None, min_region_area: int
    ) -> Prediction:
        label = bool(score > self.image_threshold_)
        if anomaly_map is None:
            return Prediction(float(score), label)
        mask = anomaly_map > self.pixel_threshold_
        regions = find_regions(anomaly_map, mask, min_region_area) if label else ()
        return Prediction(float(score), label, anomaly_map, mask, regions)

    def _score_all(
        self,
        images: list[ImageLike],
        description: str,
        full_size: bool = False,
        on_maps: MapSink | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Scores and maps of `images`; with `on_maps` each batch's maps go to it instead and
        none are kept (the returned list is empty)."""
        scores: list[np.ndarray] = []
        maps: list[np.ndarray | None] = []
        with torch.inference_mode(), torch_threads(self.torch_threads):
            for batch in self._batches(images, description):
                batch_scores, batch_maps = self._score_prepared(batch)
                scores.append(batch_scores)
                resized = self._resize_maps(batch, batch_maps, full_size)
                if full_size and self.roi_ is not None:
                    # Resizing spreads the map a few pixels past the ROI's edge: zero it again.
                    for m in resized:
                        if m is not None:
                            m[~stretch_mask(self.roi_, m.shape)] = 0.0
                if on_maps is None:
                    maps.extend(resized)
                else:
                    on_maps(resized)
        return np.concatenate(scores).astype(np.float64), maps

    def score_prepared(self, batch: Batch) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Scores (B,) and maps of a batch from `anomalens.data.preprocessing.iter_batches`, the
        region of interest applied, each map at the model's input size cut to its image's box
        (None for image-level models): what `fit` sets the thresholds from."""
        self._check_fitted()
        with torch.inference_mode(), torch_threads(self.torch_threads):
            scores, maps = self._score_prepared(batch)
            return scores, self._resize_maps(batch, maps, full_size=False)

    def _score_prepared(self, batch: Batch) -> tuple[np.ndarray, np.ndarray | None]:
        scores, maps = self._score_batch(batch.pixels)
        self._apply_roi(scores, maps, batch.boxes)
        return scores, maps

    def _batches(self, images: Sequence[ImageLike], progress: str | None = None) -> Iterator[Batch]:
        """The images as model inputs, resized the way this model was fitted (`resize`)."""
        return iter_batches(
            images, self.image_size, self.batch_size, progress, self.input_mode, self.torch_threads
        )

    @property
    def input_mode(self) -> str:
        """How images are resized for this model: what its `resize` parameter resolved to at fit
        (`resize_`, for `auto`), else the parameter itself, `squash` for methods without one."""
        return getattr(self, "resize_", None) or getattr(self, "resize", "squash")

    def _apply_roi(
        self,
        scores: np.ndarray,
        maps: np.ndarray | Sequence[np.ndarray] | None,
        boxes: Sequence[tuple[int, int, int, int]],
    ) -> None:
        """Zero each map outside the region of interest and score the image by the map's maximum
        inside it (in place)."""
        if self.roi_ is None or maps is None:
            return
        for i, (top, left, height, width) in enumerate(boxes):
            inside = np.zeros(maps[i].shape, dtype=bool)
            inside[top : top + height, left : left + width] = stretch_mask(
                self.roi_, (height, width)
            )
            maps[i][~inside] = 0.0
            scores[i] = maps[i].max()

    @staticmethod
    def _resize_maps(
        batch: Batch, maps: np.ndarray | None, full_size: bool
    ) -> list[np.ndarray | None]:
        """Each map cut to the part of the input that holds the image (letterbox), and resized to
        the image's own size when `full_size`."""
        if maps is None:
            return [None] * len(batch.sizes)
        cropped = [
            m[top : top + height, left : left + width]
            for m, (top, left, height, width) in zip(maps, batch.boxes, strict=True)
        ]
        if not full_size:
            return cropped
        return [
            resize_maps(torch.from_numpy(np.ascontiguousarray(m))[None, None], size)[0, 0].numpy()
            for m, size in zip(cropped, batch.sizes, strict=True)
        ]

    def _check_fitted(self) -> None:
        if not hasattr(self, "image_threshold_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit first")

    # ---- what a scorer implements ----------------------------------------------------------
    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores (B,) and anomaly maps (B, S, S) at the model's input size, or None."""
        raise NotImplementedError
