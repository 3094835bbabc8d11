"""The contract every detector follows (scikit-learn / PyOD style).

Constructors only store parameters. `fit(images)` learns from normal images only: it holds out a
seeded `validation_fraction` of them, learns from the rest, and sets the image and pixel thresholds
at `target_fpr` / `pixel_target_fpr` on the held-out normal images the model never saw; methods
with `refit_on_all` then learn again from all the images, keeping those thresholds.
`predict(images)` returns one `Prediction` per image (higher score = more anomalous). `calibrate`
optionally replaces both thresholds by F1-optimal ones from an explicit labelled set. Fitted state
ends in `_`. Subclasses store their parameters with `self._store_params(locals())`, implement
`_fit` and `_score_tensors` (or `_score_batch` where scoring leaves torch; only the first exports),
list the fitted tensors and networks that make up the model file in `fitted_tensors` and rebuild
the networks in `_build_state`. Methods that can learn from more images without starting over
implement `_update`, which `partial_fit` calls.
"""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch

from anomalens import progress
from anomalens.components.density import Moments
from anomalens.core.model_file import model_config, write_model_file
from anomalens.core.scorer import Scorer
from anomalens.core.thresholds import TailQuantile, threshold_at_fpr
from anomalens.data.io import load_image, region_of_interest, stretch_mask, to_rgb_array
from anomalens.data.preprocessing import ImageLike, resolve_resize
from anomalens.errors import DataError, ExportError, ImageReadError, ParameterError
from anomalens.state_dict import FittedState, Part, stored_part

_UNSET: Any = object()
"""A fitted attribute not set yet (`Detector._fitted_parts`)."""


class Detector(Scorer):
    """Base class of all anomaly detectors: a `Scorer` that learns from normal images."""

    name: ClassVar[str]
    produces_maps: ClassVar[bool] = True
    fitted_fields: ClassVar[tuple[str, ...]] = ()
    """Fitted JSON values (such as `layers_`, the layers a `layers=None` resolved to) that the
    model file's fitted config keeps, under the name without `_`. A version-1 file has none:
    its fit wrote them into the parameter of the same name, which is used instead."""
    fitted_tensors: ClassVar[tuple[str, ...]] = ()
    """Fitted tensors (or lists of them, one per level) and networks that make up the model file's
    tensors, under the name without `_` (`FittedState`): `memory_bank_` as ``memory_bank``,
    `backbone_` as ``backbone.*``. A None one (a network a variant does not have) is left out."""
    update_tensors: ClassVar[tuple[str, ...]] = ()
    """The `fitted_tensors` that only `partial_fit` needs (running sums): None in a model loaded
    from a file written before anomalens kept them, which loads and predicts but cannot update."""
    refit_on_all: ClassVar[bool] = False
    """Refit on every image once the thresholds are set, so the held-out images do not cost
    accuracy (methods whose fit is a single pass over the features; trained networks keep the
    held-out split instead of doubling their training time)."""
    feature_mean: ClassVar[str | None] = None
    """The fitted (P, d) tensor that the score graph subtracts from the patch features (PaDiM's
    mean per position), for methods whose statistics can absorb a feature error measured outside
    them (`feature_vectors`, `absorb_feature_error`): an int8 export measures its rounding there
    (`anomalens.deploy.int8`)."""

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

    @classmethod
    def check_params(cls, params: Any, owner: str | None = None) -> None:
        """Raise `ParameterError` naming the first of `params` (names) that is not a constructor
        parameter of this detector (`owner`: how the message names it; default its name)."""
        unknown = sorted(set(params) - set(cls.param_names()))
        if unknown:
            raise ParameterError(
                f"{owner or cls.name} has no parameter {unknown[0]!r}; "
                f"its parameters: {', '.join(cls.param_names())}"
            )

    def set_params(self, **params: Any) -> Self:
        """Change constructor parameters, as scikit-learn's `set_params` (fit again afterwards)."""
        self.check_params(params)
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.get_params().items())
        return f"{type(self).__name__}({params})"

    # ---- learning -------------------------------------------------------------------------
    def fit(
        self, images: Sequence[ImageLike], *, roi: ImageLike | None = None, strict: bool = False
    ) -> Self:
        """Learn from normal images only, then set thresholds on a held-out part of them.

        `roi`: a region-of-interest mask (path or array; white / nonzero = inspect), stretched to
        each image. Maps are zeroed outside it and the image score becomes the map's maximum
        inside it; it is stored in the model file. Only map-producing methods take one.
        Image files that cannot be read (corrupt, truncated, not images) are left out and listed
        in `skipped_images_` and the model file; with `strict` the first one raises its
        `ImageReadError` instead.
        """
        images, skipped = readable_images(images, strict)
        if len(images) < 2:
            raise DataError(
                f"fit needs at least 2 normal images, got {len(images)}{skipped_note(skipped)}"
            )
        if roi is not None and not self.produces_maps:
            raise ParameterError(f"{self.name} gives no anomaly map, so it cannot take an roi")
        self.roi_ = None if roi is None else region_of_interest(roi)
        if "resize" in self.param_names():
            self.resize_ = resolve_resize(self.resize, images)
        self._seed_everything()
        held_out = self._held_out(len(images))
        scores, pixels = self._fit_and_score_held_out(images, held_out)
        self._make_fitted_tensors_plain()
        self.selection_ = None  # `auto_fit` sets it after this fit
        self._set_thresholds(scores, pixels)
        self.skipped_images_ = skipped
        self.updates_: list[dict[str, Any]] = []
        return self

    def partial_fit(
        self,
        images: Sequence[ImageLike],
        *,
        old_images: Sequence[ImageLike] | None = None,
        strict: bool = False,
    ) -> Self:
        """Learn from more normal images without forgetting the earlier ones (the model keeps
        running sums or its memory bank, not the images), then set the thresholds again.

        A model not fitted yet is fitted on `images` (`fit`). Otherwise a seeded
        `validation_fraction` of the new images is held out, the model is updated with the others
        (`_update`) and the thresholds are set, as `fit` sets them, on the held-out new images
        and, given `old_images` (e.g. the folder the model was fitted on), on a seeded
        `validation_fraction` of those too, drawn as `fit` draws its held-out part: from the same
        images in the same order they are the images `fit` held out, which methods without
        `refit_on_all` (gaussian, knn) never learned from; those with it (patchcore, padim)
        learned from every training image, so their old images score a little lower than unseen
        ones and the thresholds lean low (more false alarms, not fewer detections). Without
        `old_images` the thresholds rest on the held-out new images only. With `refit_on_all`
        the held-out new images are learned afterwards. Each update is recorded in `updates_`
        (UTC time, images given, learned and held out), which the model file keeps.
        """
        if not hasattr(self, "image_threshold_"):
            return self.fit(images, strict=strict)
        if type(self)._update is Detector._update:
            raise ParameterError(
                f"{self.name} does not support partial_fit (incremental updates); "
                "fit it again on all the images"
            )
        missing = [name for name in self.update_tensors if getattr(self, name, None) is None]
        if missing:
            raise ParameterError(
                f"this {self.name} model file predates partial_fit (it has no "
                f"{missing[0][:-1]!r}); fit it again on all the images"
            )
        images, skipped = readable_images(images, strict)
        if len(images) < 2:
            raise DataError(
                f"partial_fit needs at least 2 new normal images, got {len(images)}"
                f"{skipped_note(skipped)}"
            )
        old, old_skipped = readable_images(old_images or [], strict)
        held_out = self._held_out(len(images))
        skip = set(held_out)
        learn = [image for i, image in enumerate(images) if i not in skip]
        self._seed_everything()
        self._update(learn)
        validation = [images[i] for i in held_out]
        old_held_out = [old[i] for i in self._held_out(len(old))] if old else []
        scores, pixels = self._score_held_out(validation + old_held_out)
        if self.refit_on_all:
            self._seed_everything()
            self._update(validation)
            learn = images
        self._make_fitted_tensors_plain()
        self._set_thresholds(scores, pixels)
        self.n_train_images_ += len(learn)
        self.skipped_images_ = [*self.skipped_images_, *skipped, *old_skipped]
        self.updates_.append(
            {
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
                "images": len(images),
                "learned": len(learn),
                "held_out_new": len(validation),
                "held_out_old": len(old_held_out),
            }
        )
        return self

    def _held_out(self, count: int) -> list[int]:
        """The seeded `validation_fraction` (at least one) of `count` images held out."""
        order = np.random.default_rng(self.seed).permutation(count)
        return sorted(order[: max(1, round(count * self.validation_fraction))])

    def _score_held_out(self, images: list[ImageLike]) -> tuple[np.ndarray, TailQuantile | None]:
        """The scores of held-out normal images and, for a model with maps, the largest of their
        pixels (inside the region of interest): what the thresholds are set from. The maps are
        taken batch by batch and not kept, so memory does not grow with the held-out images."""
        if not self.produces_maps:
            return self._score_all(images, "thresholds")[0], None
        per_map = self._threshold_map_pixels()
        pixels = TailQuantile(self.pixel_target_fpr, per_map and len(images) * per_map)

        def keep_pixels(maps: list[np.ndarray | None]) -> None:
            for m in maps:
                # With a region of interest, the pixels inside it only (outside, maps are zero).
                pixels.add(m if self.roi_ is None else m[stretch_mask(self.roi_, m.shape)])

        return self._score_all(images, "thresholds", on_maps=keep_pixels)[0], pixels

    def _threshold_map_pixels(self) -> int | None:
        """The most pixels one held-out map can have: the model's input size; None with `resize`
        `keep`, whose maps are as large as the images' aspect makes them (the maps are then kept
        until the thresholds are set)."""
        return None if self.input_mode == "keep" else self.image_size**2

    def _set_thresholds(self, scores: np.ndarray, pixels: TailQuantile | None) -> None:
        """Image and pixel thresholds at `target_fpr` / `pixel_target_fpr` of held-out normal
        images' scores and map pixels (`_score_held_out`)."""
        self.image_threshold_ = threshold_at_fpr(scores, self.target_fpr)
        self.pixel_threshold_ = None if pixels is None else pixels.threshold()
        self.n_validation_images_ = len(scores)
        self.validation_scores_ = np.asarray(scores, dtype=np.float64)
        self.threshold_source_ = "normal"

    @torch.inference_mode(False)
    def _make_fitted_tensors_plain(self) -> None:
        """Replace fitted tensors computed under inference mode by plain copies, which autograd
        and `torch.export` can trace (an inference tensor makes the export fall back to its
        twice as slow strict tracing)."""
        for name in self.fitted_tensors:
            part = getattr(self, name, None)
            if isinstance(part, torch.Tensor) and part.is_inference():
                setattr(self, name, part.clone())
            elif isinstance(part, list):
                setattr(self, name, [t.clone() if t.is_inference() else t for t in part])

    def _fit_and_score_held_out(
        self, images: list[ImageLike], held_out: list[int]
    ) -> tuple[np.ndarray, TailQuantile | None]:
        """Learn, and return `_score_held_out` of the `held_out` images (indices into `images`)
        from a model that never saw them: learn from the others and score the held-out ones, then,
        with `refit_on_all`, learn again from all images."""
        skip = set(held_out)
        learn = [image for i, image in enumerate(images) if i not in skip]
        self._fit(learn)
        result = self._score_held_out([images[i] for i in held_out])
        if self.refit_on_all:
            self._seed_everything()
            self._fit(images)
        self.n_train_images_ = len(images) if self.refit_on_all else len(learn)
        return result

    # ---- export -----------------------------------------------------------------------------
    def export_module(self) -> torch.nn.Module:
        """The fitted model as one traceable torch module for ONNX export
        (`anomalens.deploy.export`).

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

    def feature_vectors(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, P, d) the patch features the score graph centres on `feature_mean`."""
        raise NotImplementedError(f"{self.name} has no feature_mean")

    def absorb_feature_error(self, error: Moments) -> dict[str, torch.Tensor]:
        """New values of fitted tensors (by name) that take a feature error (features seen minus
        `feature_vectors`; its sums in `error`, one set per position) into the statistics."""
        raise NotImplementedError(f"{self.name} has no feature_mean")

    def exported_model(self) -> Detector:
        """The model whose predictions the exported graph reproduces, which the export is checked
        against: this one, unless a method exports a variant of itself (PatchCore with a
        compressed `bank_index` exports its exact search)."""
        return self

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the fitted model to one `.safetensors` file (tensors + JSON config, no pickle)."""
        self._check_fitted()
        return write_model_file(path, self._tensors(), self.model_config())

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The model file's tensors: the state dict of the `fitted_tensors`."""
        return FittedState(self._fitted_parts()).state_dict()

    def model_config(self) -> dict[str, Any]:
        """The JSON config stored in the model file and in an ONNX export's metadata."""
        return model_config(self.name, self.get_params(), self.fitted_config())

    def fitted_config(self) -> dict[str, Any]:
        """Fitted scalars saved in the model file's JSON config (with `auto_fit`'s table of
        candidates, `selection_`, when it chose this model)."""
        config = {
            **self.threshold_config(),
            "skipped_images": self.skipped_images_,
            "updates": self.updates_,
            **self._fitted_fields(),
        }
        if getattr(self, "selection_", None) is not None:
            config["selection"] = self.selection_
        return config

    def _fitted_fields(self) -> dict[str, Any]:
        return {field[:-1]: _json_ready(getattr(self, field)) for field in self.fitted_fields}

    def restore(self, tensors: dict[str, torch.Tensor], fitted: dict[str, Any]) -> None:
        """Rebuild fitted state from a model file's tensors and fitted config."""
        self.restore_thresholds(fitted)
        self.skipped_images_ = fitted.get("skipped_images", [])  # none in older model files
        self.updates_ = fitted.get("updates", [])
        self._restore_fields(fitted)
        if "selection" in fitted:
            self.selection_ = fitted["selection"]
        self._restore(tensors)

    def _restore_fields(self, fitted: dict[str, Any]) -> None:
        for field in self.fitted_fields:
            setattr(self, field, fitted.get(field[:-1], getattr(self, field[:-1], None)))

    def _restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the `fitted_tensors` from a model file's `tensors`: the networks that
        `_build_state` makes load their weights, the other parts are the file's tensors. Every
        key of the file must be used and none may be missing."""
        self._build_state()
        parts = self._fitted_parts(tensors)
        state = FittedState(parts)
        state.load_state_dict(tensors)
        state.eval()
        for name in self.fitted_tensors:
            setattr(self, name, parts[name[:-1]])

    def _fitted_parts(self, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, Part]:
        """The `fitted_tensors` by key. Given a model file's `tensors` (after `_build_state`), the
        parts other than networks and None ones are read from it."""
        parts: dict[str, Part] = {}
        for name in self.fitted_tensors:
            part = getattr(self, name, _UNSET)
            if tensors is not None and part is not None and not isinstance(part, torch.nn.Module):
                try:
                    part = stored_part(name[:-1], tensors)
                except KeyError:
                    if name not in self.update_tensors:
                        raise
                    part = None  # a file written before partial_fit
            parts[name[:-1]] = part
        return parts

    # ---- helpers ---------------------------------------------------------------------------
    def _seed_everything(self) -> None:
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)

    # ---- what a method implements ----------------------------------------------------------
    def _fit(self, images: list[ImageLike]) -> None:
        raise NotImplementedError

    def _update(self, images: list[ImageLike]) -> None:
        """Learn from more normal images, keeping what was learned (`partial_fit`); methods that
        do not implement it cannot be updated."""
        raise NotImplementedError

    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores (B,) and anomaly maps (B, S, S) at the model's input size, or None."""
        scores, maps = self._score_tensors(pixels)
        return scores.numpy(), None if maps is None else maps.numpy()

    def _score_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores (B,) and maps (B, S, S) (None for image-level methods) as one torch function of
        the pixels, which both `predict` and the exported ONNX graph run."""
        raise NotImplementedError

    def _build_state(self) -> None:
        """Build the networks among the `fitted_tensors` (random weights), from the parameters
        and the fitted config, for a model file's weights to load into; set those that this
        variant does not have to None."""


def readable_images(
    images: Sequence[ImageLike], strict: bool = False, *, as_arrays: bool = False
) -> tuple[list[ImageLike], list[dict[str, str]]]:
    """The images whose files can be read (arrays and PIL images pass unchecked) and, for each
    file that cannot, its path and the reason; with `strict` the first such file raises its
    `ImageReadError`. Each file is decoded and dropped, so memory stays bounded, unless
    `as_arrays` (for a caller that holds them all anyway) returns every image as an array."""
    readable: list[ImageLike] = []
    skipped: list[dict[str, str]] = []
    for image in progress.track(images, "reading images", unit="img"):
        if not isinstance(image, str | os.PathLike):
            readable.append(to_rgb_array(image) if as_arrays else image)
            continue
        try:
            array = load_image(image)
        except ImageReadError as error:
            if strict:
                raise
            reason = str(error).removeprefix(f"cannot read image {image}: ")
            skipped.append({"path": str(image), "reason": reason})
        else:
            readable.append(array if as_arrays else image)
    return readable, skipped


def skipped_note(skipped: list[dict[str, str]]) -> str:
    """How error messages mention the unreadable images left out, if any."""
    return f" ({len(skipped)} unreadable image(s) skipped)" if skipped else ""


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
