"""Any map-producing detector applied tile by tile to high-resolution images
(`anomalens.components.tiling`).

`fit` learns the wrapped detector from the tiles of the normal images (so it sees them at the same
scale as it will at predict time); thresholds are set, as for every detector, on whole held-out
normal images. An image's score is the highest score of its tiles; its anomaly map is the tiles'
maps stitched at full resolution (maximum or mean where tiles overlap).

    model = anomalens.create("tiled", detector="patchcore", tile_size=512, tile_overlap=64)
    # or: anomalens.models.tiled.tiled("patchcore", tile_size=512, coreset_ratio=0.05)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from anomalens.components.tiling import Stitcher, TiledImages, check_tiling, tile_grid
from anomalens.core.detector import Detector
from anomalens.core.registry import create, register
from anomalens.core.scorer import MapSink
from anomalens.data.io import to_rgb_array
from anomalens.data.preprocessing import ImageLike, resize_to_tensor, resolve_resize
from anomalens.errors import AnomalensError
from anomalens.progress import make_progress
from anomalens.state_dict import under_prefix, with_prefix

THRESHOLD_PIXELS = 1 << 20
"""Pixels per held-out image used for the pixel threshold (a regular subsample beyond this)."""


@register
class Tiled(Detector):
    """`detector` (with `detector_params`) run on overlapping `tile_size` tiles, maps stitched."""

    name = "tiled"

    def __init__(
        self,
        detector: str = "patchcore",
        detector_params: dict[str, Any] | None = None,
        tile_size: int = 512,
        tile_overlap: int = 64,
        stitch: str = "max",
        *,
        image_size: int = 256,
        target_fpr: float = 0.01,
        pixel_target_fpr: float = 0.001,
        validation_fraction: float = 0.1,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        self._store_params(locals())

    def _inner(self) -> Detector:
        params = dict(self.detector_params or {})
        shared = sorted(set(params) & set(Detector.param_names()))
        if shared:
            raise AnomalensError(
                f"set {shared[0]} on the tiled model itself, not in detector_params"
            )
        inner = create(
            self.detector,
            **params,
            image_size=self.image_size,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        if "resize" in inner.param_names():  # tiles are square: `auto` resolves to `squash`
            inner.resize_ = resolve_resize(inner.resize, [])
        if not inner.produces_maps:
            raise AnomalensError(
                f"tiling needs a detector that produces anomaly maps; {self.detector} is "
                "image-level only"
            )
        return inner

    def _fit(self, images: list[ImageLike]) -> None:
        check_tiling(self.tile_size, self.tile_overlap, self.stitch)
        self.detector_ = self._inner()
        self.detector_._fit(TiledImages(images, self.tile_size, self.tile_overlap))

    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Tiles already cut and resized to (B, 3, S, S): the wrapped detector's scores and maps."""
        return self.detector_._score_batch(pixels)

    def _score_image(self, image: np.ndarray) -> tuple[float, Stitcher]:
        height, width = image.shape[:2]
        tiles = tile_grid(height, width, self.tile_size, self.tile_overlap)
        stitcher = Stitcher(height, width, self.image_size / self.tile_size, self.stitch)
        best = -math.inf
        for start in range(0, len(tiles), self.batch_size):
            chunk = tiles[start : start + self.batch_size]
            crops = [image[top : top + h, left : left + w] for top, left, h, w in chunk]
            scores, maps = self.detector_._score_batch(resize_to_tensor(crops, self.image_size))
            best = max(best, float(np.max(scores)))
            for tile, tile_map in zip(chunk, maps, strict=True):
                stitcher.add(tile, tile_map)
        return best, stitcher

    def _score_all(
        self,
        images: list[ImageLike],
        description: str,
        full_size: bool = False,
        on_maps: MapSink | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Per image, its best tile score and the stitched map: at the image's size when
        `full_size`, else on the tiles' model-resolution canvas, regularly subsampled to at most
        `THRESHOLD_PIXELS` pixels (enough for a pixel threshold, without gigabytes of maps).
        With `on_maps` each map goes to it instead and none are kept."""
        scores: list[float] = []
        maps: list[np.ndarray | None] = []
        with make_progress() as progress, torch.inference_mode():
            task = progress.add_task(description, total=len(images), info="", unit="img")
            for image in images:
                array = to_rgb_array(image)
                score, stitcher = self._score_image(array)
                if full_size:
                    stitched = stitcher.result(array.shape[:2])
                else:
                    stitched = subsampled(stitcher.result(), THRESHOLD_PIXELS)
                best = np.array([score], dtype=np.float64)
                self._apply_roi(best, [stitched], [(0, 0, *stitched.shape)])
                scores.append(float(best[0]))
                if on_maps is None:
                    maps.append(stitched)
                else:
                    on_maps([stitched])
                progress.advance(task)
        return np.asarray(scores, dtype=np.float64), maps

    def _threshold_map_pixels(self) -> int:
        return THRESHOLD_PIXELS

    def _tensors(self) -> dict[str, torch.Tensor]:
        return with_prefix("detector", self.detector_._tensors())

    def fitted_config(self) -> dict[str, Any]:
        return {**super().fitted_config(), "detector": self.detector_._fitted_fields()}

    def restore(self, tensors: dict[str, torch.Tensor], fitted: dict[str, Any]) -> None:
        self.detector_ = self._inner()
        self.detector_._restore_fields(fitted.get("detector", {}))
        super().restore(tensors, fitted)

    def _restore(self, tensors: dict[str, torch.Tensor]) -> None:
        self.detector_._restore(under_prefix("detector", tensors))


def tiled(
    detector: str,
    tile_size: int = 512,
    tile_overlap: int = 64,
    stitch: str = "max",
    **params: Any,
) -> Tiled:
    """A `Tiled` model: `params` that every detector shares (image_size, seed, thresholds...) go
    to the tiled model, the rest to `detector`."""
    shared = set(Detector.param_names())
    return Tiled(
        detector,
        {k: v for k, v in params.items() if k not in shared},
        tile_size,
        tile_overlap,
        stitch,
        **{k: v for k, v in params.items() if k in shared},
    )


def subsampled(canvas: np.ndarray, limit: int) -> np.ndarray:
    """Every `step`-th row and column of `canvas`, the smallest step that leaves at most `limit`
    pixels."""
    step = max(1, math.ceil(math.sqrt(canvas.size / limit)))
    while math.ceil(canvas.shape[0] / step) * math.ceil(canvas.shape[1] / step) > limit:
        step += 1
    return np.ascontiguousarray(canvas[::step, ::step])
