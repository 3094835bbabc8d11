"""The contract every detector follows (scikit-learn / PyOD style).

Constructors only store parameters. `fit(images)` learns from normal images only: it holds out a
seeded `validation_fraction` of them, learns from the rest, and sets the image and pixel thresholds
at `target_fpr` / `pixel_target_fpr` on the held-out normal images the model never saw; methods
with `refit_on_all` then learn again from all the images, keeping those thresholds.
`predict(images)` returns one `Prediction` per image (higher score = more anomalous). `calibrate`
optionally replaces both thresholds by F1-optimal ones from an explicit labelled set. Fitted state
ends in `_`. Subclasses store their parameters with `self._store_params(locals())` and implement
`_fit`, `_score_tensors` (or `_score_batch` where scoring leaves torch; only the first exports),
`_tensors` and `_restore`.
"""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch

from anomalens.data.io import decode_mask, encode_mask, region_of_interest, stretch_mask
from anomalens.errors import DataError, ExportError, NotFittedError, ParameterError
from anomalens.ops import resize_maps
from anomalens.prediction import Prediction
from anomalens.preprocessing import Batch, ImageLike, iter_batches
from anomalens.progress import make_progress
from anomalens.thresholds import (
    f1_optimal_threshold,
    pixel_f1_optimal_threshold,
    threshold_at_fpr,
)


class Detector:
    """Base class of all anomaly detectors."""

    name: ClassVar[str]
    produces_maps: ClassVar[bool] = True
    refit_on_all: ClassVar[bool] = False
    """Refit on every image once the thresholds are set, so the held-out images do not cost
    accuracy (methods whose fit is a single pass over the features; trained networks keep the
    held-out split instead of doubling their training time)."""

    def __init__(
        self,
        *,
        image_size: int = 256,
        target_fpr: float = 0.01,
        pixel_target_fpr: float = 0.001,
        validation_fraction: float = 0.1,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        self.image_size = image_size
        self.target_fpr = target_fpr
        self.pixel_target_fpr = pixel_target_fpr
        self.validation_fraction = validation_fraction
        self.batch_size = batch_size
        self.seed = seed

    def _store_params(self, values: dict[str, Any]) -> None:
        """Store each constructor parameter under its own name, unchanged: a subclass's
        `__init__` is just `self._store_params(locals())`, as scikit-learn asks of constructors."""
        for name in self.param_names():
            setattr(self, name, values[name])

    @classmethod
    def param_names(cls) -> list[str]:
        """The constructor's parameter names, as scikit-learn reads them from the signature."""
        return [
            parameter.name
            for parameter in inspect.signature(cls.__init__).parameters.values()
            if parameter.name != "self"
            and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
        ]

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters, as scikit-learn's `get_params`, JSON-ready (tuples as lists,
        paths as strings) for a model file's config."""
        return {name: _json_ready(getattr(self, name)) for name in self.param_names()}

    def set_params(self, **params: Any) -> Self:
        """Change constructor parameters, as scikit-learn's `set_params` (fit again afterwards)."""
        unknown = sorted(set(params) - set(self.param_names()))
        if unknown:
            raise ParameterError(
                f"{self.name} has no parameter {unknown[0]!r}; "
                f"its parameters: {', '.join(self.param_names())}"
            )
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.get_params().items())
        return f"{type(self).__name__}({params})"

    # ---- learning -------------------------------------------------------------------------
    def fit(self, images: Sequence[ImageLike], *, roi: ImageLike | None = None) -> Self:
        """Learn from normal images only, then set thresholds on a held-out part of them.

        `roi`: a region-of-interest mask (path or array; white / nonzero = inspect), stretched to
        each image. Maps are zeroed outside it and the image score becomes the map's maximum
        inside it; it is stored in the model file. Only map-producing methods take one.
        """
        images = list(images)
        if len(images) < 2:
            raise DataError(f"fit needs at least 2 normal images, got {len(images)}")
        if roi is not None and not self.produces_maps:
            raise ParameterError(f"{self.name} gives no anomaly map, so it cannot take an roi")
        self.roi_ = None if roi is None else region_of_interest(roi)
        self._seed_everything()
        order = np.random.default_rng(self.seed).permutation(len(images))
        held_out = sorted(order[: max(1, round(len(images) * self.validation_fraction))])
        scores, maps = self._fit_and_score_held_out(images, held_out)
        self.selection_ = None  # `auto_fit` sets it after this fit
        self.image_threshold_ = threshold_at_fpr(scores, self.target_fpr)
        if self.produces_maps:
            pixels = np.concatenate([m.ravel() for m in maps])
            self.pixel_threshold_ = threshold_at_fpr(pixels, self.pixel_target_fpr)
        else:
            self.pixel_threshold_ = None
        self.n_validation_images_ = len(held_out)
        self.threshold_source_ = "normal"
        return self

    def _fit_and_score_held_out(
        self, images: list[ImageLike], held_out: list[int]
    ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Learn, and return the scores and maps of the `held_out` images (indices into `images`)
        from a model that never saw them: learn from the others and score the held-out ones, then,
        with `refit_on_all`, learn again from all images."""
        skip = set(held_out)
        learn = [image for i, image in enumerate(images) if i not in skip]
        self._fit(learn)
        result = self._score_all([images[i] for i in held_out], "thresholds")
        if self.refit_on_all:
            self._seed_everything()
            self._fit(images)
        self.n_train_images_ = len(images) if self.refit_on_all else len(learn)
        return result

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

    # ---- inference -------------------------------------------------------------------------
    def predict(self, images: Sequence[ImageLike]) -> list[Prediction]:
        """Score, label, anomaly map (HxW at the image's own size) and mask for every image."""
        self._check_fitted()
        scores, maps = self._score_all(list(images), "predicting", full_size=True)
        return [self._prediction(score, m) for score, m in zip(scores, maps, strict=True)]

    def decision_function(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Anomaly scores only (higher = more anomalous), like PyOD's `decision_function`."""
        self._check_fitted()
        return self._score_all(list(images), "scoring")[0]

    def predict_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores (B,) and maps (B, S, S) for an already resized (B, 3, S, S) tensor in [0, 1]."""
        self._check_fitted()
        with torch.inference_mode():
            scores, maps = self._score_batch(pixels)
        self._apply_roi(scores, maps, [(0, 0, *pixels.shape[-2:])] * len(scores))
        return scores, maps

    def _prediction(self, score: float, anomaly_map: np.ndarray | None) -> Prediction:
        mask = None if anomaly_map is None else anomaly_map > self.pixel_threshold_
        return Prediction(float(score), bool(score > self.image_threshold_), anomaly_map, mask)

    def _score_all(
        self, images: list[ImageLike], description: str, full_size: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        scores: list[np.ndarray] = []
        maps: list[np.ndarray | None] = []
        with make_progress() as progress, torch.inference_mode():
            task = progress.add_task(description, total=len(images), info="")
            for batch in self._batches(images):
                batch_scores, batch_maps = self._score_batch(batch.pixels)
                self._apply_roi(batch_scores, batch_maps, batch.boxes)
                scores.append(batch_scores)
                resized = self._resize_maps(batch, batch_maps, full_size)
                if full_size and getattr(self, "roi_", None) is not None:
                    # Resizing spreads the map a few pixels past the ROI's edge: zero it again.
                    for m in resized:
                        if m is not None:
                            m[~stretch_mask(self.roi_, m.shape)] = 0.0
                maps.extend(resized)
                progress.advance(task, len(batch.sizes))
        return np.concatenate(scores).astype(np.float64), maps

    def _apply_roi(
        self,
        scores: np.ndarray,
        maps: np.ndarray | None,
        boxes: Sequence[tuple[int, int, int, int]],
    ) -> None:
        """Zero each map outside the region of interest and score the image by the map's maximum
        inside it (in place)."""
        if getattr(self, "roi_", None) is None or maps is None:
            return
        for i, (top, left, height, width) in enumerate(boxes):
            inside = np.zeros(maps[i].shape, dtype=bool)
            inside[top : top + height, left : left + width] = stretch_mask(
                self.roi_, (height, width)
            )
            maps[i][~inside] = 0.0
            scores[i] = maps[i].max()

    def _batches(self, images: Sequence[ImageLike]) -> Iterator[Batch]:
        """The images as model inputs, resized the way this model was fitted (`resize`)."""
        return iter_batches(images, self.image_size, self.batch_size, self.input_mode)

    @property
    def input_mode(self) -> str:
        """How images are resized for this model: its `resize` parameter, `squash` for methods
        without one."""
        return getattr(self, "resize", "squash")

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

    # ---- export -----------------------------------------------------------------------------
    def export_module(self) -> torch.nn.Module:
        """The fitted model as one traceable torch module for ONNX export (`anomalens.export`).

        Its forward takes pixels (B, 3, S, S) in [0, 1] and returns (scores (B,), maps (B, S, S)),
        or (scores,) for image-level methods, computing what `_score_batch` computes. Methods
        that implement `_score_tensors` get one for free; methods without one raise
        `ExportError`.
        """
        self._check_fitted()
        if type(self)._score_tensors is Detector._score_tensors:
            raise ExportError(
                f"{self.name} models cannot be exported to ONNX (no exportable graph)"
            )
        return ScoreGraph(self)

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the fitted model to one `.safetensors` file (tensors + JSON config, no pickle)."""
        from anomalens.model_io import save_model

        self._check_fitted()
        return save_model(self, path)

    def fitted_config(self) -> dict[str, Any]:
        """Fitted scalars saved in the model file's JSON config (with `auto_fit`'s table of
        candidates, `selection_`, when it chose this model)."""
        config = {
            "image_threshold": self.image_threshold_,
            "pixel_threshold": self.pixel_threshold_,
            "n_train_images": self.n_train_images_,
            "n_validation_images": self.n_validation_images_,
            "threshold_source": self.threshold_source_,
            "roi": None if getattr(self, "roi_", None) is None else encode_mask(self.roi_),
        }
        if getattr(self, "selection_", None) is not None:
            config["selection"] = self.selection_
        return config

    def restore(self, tensors: dict[str, torch.Tensor], fitted: dict[str, Any]) -> None:
        """Rebuild fitted state from a model file's tensors and fitted config."""
        self.image_threshold_ = float(fitted["image_threshold"])
        pixel = fitted.get("pixel_threshold")
        self.pixel_threshold_ = None if pixel is None else float(pixel)
        self.n_train_images_ = int(fitted["n_train_images"])
        self.n_validation_images_ = int(fitted["n_validation_images"])
        self.threshold_source_ = str(fitted["threshold_source"])
        self.roi_ = None if fitted.get("roi") is None else decode_mask(fitted["roi"])
        if "selection" in fitted:
            self.selection_ = fitted["selection"]
        self._restore(tensors)

    # ---- helpers ---------------------------------------------------------------------------
    def _seed_everything(self) -> None:
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)

    def _check_fitted(self) -> None:
        if not hasattr(self, "image_threshold_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit first")

    # ---- what a method implements ----------------------------------------------------------
    def _fit(self, images: list[ImageLike]) -> None:
        raise NotImplementedError

    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores (B,) and anomaly maps (B, S, S) at the model's input size, or None."""
        scores, maps = self._score_tensors(pixels)
        return scores.numpy(), None if maps is None else maps.numpy()

    def _score_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores (B,) and maps (B, S, S) (None for image-level methods) as one torch function of
        the pixels, which both `predict` and the exported ONNX graph run."""
        raise NotImplementedError

    def _tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _restore(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


class ScoreGraph(torch.nn.Module):
    """A detector as one traceable module: forward is the detector's own `_score_tensors`, so
    predict and the export cannot disagree. Its networks are registered as submodules (weights
    stay parameters); its other fitted tensors are traced as constants."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector
        for name, value in vars(detector).items():
            if isinstance(value, torch.nn.Module):
                self.add_module(name.rstrip("_"), value)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scores, maps = self.detector._score_tensors(pixels)
        return (scores,) if maps is None else (scores, maps)


def _json_ready(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_json_ready(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
