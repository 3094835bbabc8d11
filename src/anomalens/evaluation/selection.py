"""A self-configuring fit: choose the method and its settings from normal images alone.

`auto_fit` splits the normal images (seeded) into a fit part and a held-out part and pastes one
synthetic anomaly (`anomalens.data.augment.synthetic_anomalies`: CutPaste patches, scars, thin
cracks, noise-texture blotches of three sizes) into each of `anomalies_per_image` copies of every
held-out image. Each candidate is fitted on the fit part and scores the held-out normal images and
their anomalous copies. Its **score** is the mean of the image AUROC (normal vs anomalous copies)
and the pixel AUROC on the pasted masks: the image AUROC is what a user gets, and the pixel AUROC
keeps separating candidates when several detect every pasted anomaly (image AUROC 1.0); image-level
candidates are scored by their image AUROC alone. The best score wins (ties: the cheaper
candidate) and is refitted on all images with its ordinary `fit`, so its thresholds are set as
usual; the table of candidates travels with it in `selection_` and its model file.

Candidates run cheapest first. After the first, the seconds per unit of estimated cost are known,
and a candidate is skipped (and listed as such) when running it and then refitting the winner on
all images would pass `time_budget_s`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from anomalens.core.detector import readable_images, skipped_note
from anomalens.core.registry import create, model_class
from anomalens.data.augment import SYNTHETIC_KINDS, synthetic_anomalies
from anomalens.data.preprocessing import RESIZE_AUTO, ImageLike, resolve_resize
from anomalens.errors import AnomalensError, DataError
from anomalens.evaluation.metrics import image_auroc, pixel_auroc
from anomalens.features.backbones import OFFLINE_WEIGHTS, layers_with_strides

SCORE = "mean of image AUROC and pixel AUROC on synthetic anomalies in held-out normal images"
_BACKBONE_COST = {
    "tf_efficientnet_lite0": 1.0,
    "tf_efficientnet_lite2": 1.5,
    "mobilenetv2_100": 0.9,
    "handcrafted": 0.7,
}
_METHOD_COST = {"patchcore": 1.0, "padim": 0.5}
_OVERHEAD = 0.25
"""Cost of building a candidate (backbone, weights), whatever its input size."""


@dataclass(frozen=True)
class Candidate:
    """One configuration to try: a model name and its constructor parameters; `cost` is its
    estimated relative run time (only the order and the ratios matter)."""

    model: str
    params: dict[str, Any] = field(default_factory=dict)
    cost: float = 1.0

    @property
    def label(self) -> str:
        """Short name for tables: model, backbone, input size, layers, resize mode."""
        parts = [self.model]
        backbone = self.params.get("backbone")
        if backbone:
            parts.append(str(backbone).removeprefix("tf_efficientnet_"))
        if "image_size" in self.params:
            parts.append(str(self.params["image_size"]))
        if self.params.get("layers"):
            parts.append("+".join(self.params["layers"]))
        if self.params.get("resize"):
            parts.append(str(self.params["resize"]))
        if self.params.get("intensity", "raw") != "raw":
            parts.append(str(self.params["intensity"]))
        return " ".join(parts)


def candidate(model: str, cost_factor: float = 1.0, **params: Any) -> Candidate:
    """A `Candidate` whose cost is estimated from its method, backbone and input size, times
    `cost_factor` (e.g. 2.5 for PatchCore on a stride-4 grid: 4x the patches)."""
    size = params.get("image_size", model_class(model)().image_size)
    cost = (size / 256) ** 2 * _METHOD_COST.get(model, 2.0) * cost_factor
    cost *= _BACKBONE_COST.get(params.get("backbone", "tf_efficientnet_lite0"), 1.5)
    return Candidate(model, params, round(_OVERHEAD + cost, 3))


def default_candidates(non_square: bool = False, auto_resize: str = "squash") -> list[Candidate]:
    """The default grid: PatchCore and PaDiM on the offline backbones, input sizes 224/256/320,
    PatchCore also on the finer stride 4+8 layers and on any other installed offline backbone
    (MobileNetV2), PaDiM also on the handcrafted features, both also with each image's intensity
    standardised (`intensity="standardize"`); with `non_square` images also PatchCore
    resized the other way than its default (`resize="auto"`) resolves to on them
    (`auto_resize`: keeping the aspect ratio, or squashing) and PaDiM letterboxed (when the
    detectors have the `resize` parameter)."""
    lite0, lite2 = "tf_efficientnet_lite0", "tf_efficientnet_lite2"
    grid = [
        candidate("patchcore", backbone=lite0, image_size=224),
        candidate("patchcore", backbone=lite0, image_size=256),
        candidate("patchcore", backbone=lite0, image_size=320),
        candidate(
            "patchcore",
            2.5,
            backbone=lite0,
            image_size=256,
            layers=list(layers_with_strides(lite0, (4, 8))),
        ),
        candidate("padim", backbone=lite0, image_size=256),
        candidate("patchcore", backbone=lite2, image_size=256),
        candidate("padim", backbone=lite2, image_size=256),
        candidate("padim", backbone="handcrafted", image_size=256),
        candidate("patchcore", backbone=lite0, image_size=256, intensity="standardize"),
        candidate("padim", backbone=lite0, image_size=256, intensity="standardize"),
    ]
    grid += [
        candidate("patchcore", backbone=name, image_size=256)
        for name, weights in OFFLINE_WEIGHTS.items()
        if name not in (lite0, lite2) and weights.installed()
    ]
    if non_square and "resize" in model_class("patchcore").param_names():
        grid += [
            candidate(
                "patchcore",
                backbone=lite0,
                image_size=256,
                resize="squash" if auto_resize == "keep" else "keep",
            ),
            candidate("padim", backbone=lite0, image_size=256, resize="letterbox"),
        ]
    return grid


def auto_fit(
    images: Sequence[ImageLike],
    candidates: Sequence[Candidate] | None = None,
    time_budget_s: float = 600.0,
    seed: int = 0,
    *,
    max_fit_images: int = 40,
    held_out: int = 16,
    anomalies_per_image: int = 2,
    kinds: Sequence[str] = SYNTHETIC_KINDS,
    strict: bool = False,
) -> tuple[Any, list[dict[str, Any]]]:
    """Choose among `candidates` (default: `default_candidates()`) by their score on synthetic
    anomalies (see the module docstring), refit the winner on all `images` and return it with
    the table of candidates (also in its `selection_`). At most `max_fit_images` images fit each
    candidate and `held_out` are held out; `kinds` are the synthetic anomalies pasted (default:
    all). The same `seed` gives the same choice, as long as the time budget does not cut the
    search. Unreadable image files are skipped and listed as `fit` does (`strict`: raise)."""
    started = time.perf_counter()
    arrays, skipped = readable_images(images, strict, as_arrays=True)
    if len(arrays) < 4:
        raise DataError(
            f"auto_fit needs at least 4 normal images, got {len(arrays)}{skipped_note(skipped)}"
        )
    if candidates is None:
        non_square = any(a.shape[0] != a.shape[1] for a in arrays)
        candidates = default_candidates(non_square, resolve_resize(RESIZE_AUTO, arrays))
    if not candidates:
        raise DataError("auto_fit got no candidates")
    order = np.random.default_rng(seed).permutation(len(arrays))
    n_held = min(held_out, max(2, len(arrays) // 4))
    normal = [arrays[i] for i in sorted(order[:n_held])]
    fit_part = [arrays[i] for i in sorted(order[n_held:][:max_fit_images])]
    anomalous, masks, pasted = _paste_anomalies(normal, anomalies_per_image, kinds, seed)
    test = normal + anomalous
    truth = [np.zeros(a.shape[:2], dtype=bool) for a in normal] + masks
    labels = [0] * len(normal) + [1] * len(anomalous)
    refit_factor = len(arrays) / (len(fit_part) + len(test))

    rows: list[dict[str, Any]] = []
    spent_s = spent_cost = 0.0
    best: tuple[float, float, int] | None = None  # (-score, cost, row) of the leader
    for item in sorted(candidates, key=lambda c: c.cost):
        row: dict[str, Any] = {
            "candidate": item.label,
            "model": item.model,
            "params": dict(item.params),
            "status": "ok",
            "synthetic_image_auroc": None,
            "synthetic_pixel_auroc": None,
            "score": None,
            "seconds": None,
            "chosen": False,
        }
        rows.append(row)
        if spent_cost > 0:
            rate = spent_s / spent_cost
            leader_cost = 0.0 if best is None else best[1]
            needed = rate * (item.cost + refit_factor * max(item.cost, leader_cost))
            if time.perf_counter() - started + needed > time_budget_s:
                row["status"] = f"skipped: needs about {needed:.0f} s"
                continue
        run_started = time.perf_counter()
        try:
            detector = create(item.model, **{"seed": seed, **item.params})
            detector.fit(fit_part)
            predictions = detector.predict(test)
        except AnomalensError as error:
            row["status"] = f"failed: {error}"
            continue
        row["seconds"] = round(time.perf_counter() - run_started, 2)
        spent_s += row["seconds"]
        spent_cost += item.cost
        row["synthetic_image_auroc"] = image_auroc(labels, [p.score for p in predictions])
        if detector.produces_maps:
            row["synthetic_pixel_auroc"] = pixel_auroc(truth, [p.anomaly_map for p in predictions])
        values = [row["synthetic_image_auroc"], row["synthetic_pixel_auroc"]]
        row["score"] = float(np.mean([v for v in values if v is not None]))
        key = (-row["score"], item.cost, len(rows) - 1)
        if best is None or key < best:
            best = key
    if best is None:
        raise AnomalensError(f"auto_fit: no candidate could be fitted ({rows[0]['status']})")
    winner = rows[best[2]]
    winner["chosen"] = True
    detector = create(winner["model"], **{"seed": seed, **winner["params"]})
    detector.fit(arrays)
    detector.skipped_images_ = skipped
    detector.selection_ = {
        "chosen": winner["candidate"],
        "score": SCORE,
        "n_fit_images": len(fit_part),
        "n_held_out_images": len(normal),
        "n_synthetic_anomalies": len(anomalous),
        "synthetic_kinds": sorted(set(pasted)),
        "time_budget_s": time_budget_s,
        "seconds": round(time.perf_counter() - started, 1),
        "candidates": rows,
    }
    return detector, rows


def _paste_anomalies(
    images: list[np.ndarray], per_image: int, kinds: Sequence[str], seed: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """`per_image` anomalous copies of every image (uint8 HxWx3), the kinds cycling through
    `kinds`; returns the copies, their masks and their kinds."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255.0 for a in images]
    copies, masks, kinds = synthetic_anomalies(tensors * per_image, generator, kinds)
    pictures = [(c.permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy() for c in copies]
    return pictures, [m.numpy() for m in masks], kinds
