"""Tiling of high-resolution images: overlapping tiles in, one stitched anomaly map out.

A 4000x3000 image resized to 256x256 shrinks a 20-pixel defect to about one pixel; cut into tiles
of, say, 512 pixels, each tile is seen 16x more finely. `tile_grid` lays overlapping tiles over an
image (the last tile of a row or column is flush with the border), `TiledImages` serves the tiles
of many images lazily (so a detector fits on them as on ordinary images), and `Stitcher` puts the
tiles' anomaly maps back together, taking the maximum or the mean where tiles overlap. The
`tiled` detector (`anomalens.models.tiled`) wraps any map-producing detector with these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

import numpy as np
import torch

from anomalens.components.maps import resize_maps
from anomalens.data.io import image_shape, to_rgb_array
from anomalens.data.preprocessing import ImageLike
from anomalens.errors import AnomalensError

STITCH_MODES = ("max", "mean")


def check_tiling(tile_size: int, tile_overlap: int, stitch: str) -> None:
    """Raise one clear error for an unusable tiling setting."""
    if tile_size < 8:
        raise AnomalensError(f"tile size must be at least 8 pixels, got {tile_size}")
    if not 0 <= tile_overlap < tile_size:
        raise AnomalensError(
            f"tile overlap must be in [0, tile size = {tile_size}), got {tile_overlap}"
        )
    if stitch not in STITCH_MODES:
        raise AnomalensError(f"stitch must be one of {', '.join(STITCH_MODES)}, got {stitch!r}")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side `tile` overlapping by at least `overlap` pixels that cover
    [0, length); the last tile ends at `length`. One tile at 0 if the image is not larger."""
    if length <= tile:
        return [0]
    step = tile - overlap
    count = math.ceil((length - tile) / step) + 1
    return [min(i * step, length - tile) for i in range(count)]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(top, left, tile height, tile width) of every tile, row by row. Tiles are `tile` square,
    clipped to the image where the image is smaller than a tile."""
    tile_h, tile_w = min(tile, height), min(tile, width)
    return [
        (top, left, tile_h, tile_w)
        for top in tile_starts(height, tile, overlap)
        for left in tile_starts(width, tile, overlap)
    ]


class TiledImages(Sequence[np.ndarray]):
    """The tiles of `images` as one lazy sequence of HxWx3 uint8 arrays (images in order, tiles
    row by row). Each image is decoded once while its tiles are read in order."""

    def __init__(self, images: Sequence[ImageLike], tile: int, overlap: int) -> None:
        self.images = list(images)
        self.tile, self.overlap = tile, overlap
        counts = [len(tile_grid(*image_shape(image), tile, overlap)) for image in self.images]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...
    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"tile {index} out of range ({len(self)} tiles)")
        index %= len(self)
        which = int(np.searchsorted(self.offsets, index, side="right")) - 1
        if self._cached is None or self._cached[0] != which:
            self._cached = (which, to_rgb_array(self.images[which]))
        array = self._cached[1]
        grid = tile_grid(array.shape[0], array.shape[1], self.tile, self.overlap)
        top, left, height, width = grid[index - int(self.offsets[which])]
        return np.ascontiguousarray(array[top : top + height, left : left + width])


class Stitcher:
    """One anomaly map on a canvas of the image scaled by `scale`, built from tile maps.

    `add(tile, tile_map)` resizes a tile's map to the tile's footprint on the canvas and merges
    it: the maximum over overlapping tiles for ``mode="max"``, their mean for ``"mean"``.
    """

    def __init__(self, height: int, width: int, scale: float, mode: str = "max") -> None:
        self.scale, self.mode = scale, mode
        shape = (max(1, round(height * scale)), max(1, round(width * scale)))
        fill = -np.inf if mode == "max" else 0.0
        self.canvas = torch.full(shape, fill, dtype=torch.float32)
        self.counts = torch.zeros(shape, dtype=torch.float32)

    def add(self, tile: tuple[int, int, int, int], tile_map: np.ndarray | torch.Tensor) -> None:
        top, left, height, width = tile
        y0, x0 = round(top * self.scale), round(left * self.scale)
        y1 = min(self.canvas.shape[0], max(y0 + 1, round((top + height) * self.scale)))
        x1 = min(self.canvas.shape[1], max(x0 + 1, round((left + width) * self.scale)))
        values = resize_maps(torch.as_tensor(tile_map)[None, None], (y1 - y0, x1 - x0))[0, 0]
        region = self.canvas[y0:y1, x0:x1]
        if self.mode == "max":
            torch.maximum(region, values, out=region)
        else:
            region += values
        self.counts[y0:y1, x0:x1] += 1

    def result(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """The stitched map (float32), resized to `size` = (H, W) if given."""
        stitched = self.canvas if self.mode == "max" else self.canvas / self.counts.clamp_min(1)
        if size is not None:
            stitched = resize_maps(stitched[None, None], size)[0, 0]
        return stitched.numpy().astype(np.float32, copy=False)
