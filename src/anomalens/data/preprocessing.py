"""Turning user images (paths, PIL images, arrays) into model-sized tensors, in streamed batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anomalens.data.io import to_rgb_array
from anomalens.progress import make_progress

ImageLike = str | PathLike | np.ndarray | Any
"""A path to an image file, a PIL image, or a uint8/uint16/float/bool array (HxW or HxWxC)."""


@dataclass(frozen=True)
class Batch:
    """Images resized to the model's input size, with their original sizes (H, W)."""

    pixels: torch.Tensor
    sizes: list[tuple[int, int]]


def resize_to_tensor(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """HxWx3 uint8 arrays -> float tensor (B, 3, size, size) in [0, 1] (bilinear, antialiased)."""
    resized = []
    for image in images:
        tensor = torch.from_numpy(np.require(image, requirements=["C", "W"]))
        tensor = tensor.permute(2, 0, 1)[None].float()
        if tuple(tensor.shape[-2:]) != (size, size):
            tensor = F.interpolate(
                tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        resized.append(tensor)
    return (torch.cat(resized) / 255.0).clamp_(0.0, 1.0)


def iter_batches(
    images: Sequence[ImageLike], size: int, batch_size: int, progress: str | None = None
) -> Iterator[Batch]:
    """Load and resize images lazily, `batch_size` at a time, so memory stays flat; with a
    `progress` label, a progress bar counts the images done."""
    with make_progress() as bar:
        task = bar.add_task(progress or "", total=len(images), info="", visible=bool(progress))
        for start in range(0, len(images), batch_size):
            arrays = [to_rgb_array(image) for image in images[start : start + batch_size]]
            yield Batch(resize_to_tensor(arrays, size), [a.shape[:2] for a in arrays])
            bar.advance(task, len(arrays))


def load_resized(images: Sequence[ImageLike], size: int, batch_size: int = 32) -> torch.Tensor:
    """All images resized to `size` as one uint8 tensor (N, 3, size, size), for methods that
    train for many epochs (1,000 images at 256 px take 200 MB)."""
    stored = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    start = 0
    for batch in iter_batches(images, size, batch_size, "loading images"):
        count = len(batch.sizes)
        stored[start : start + count] = (batch.pixels * 255).round().to(torch.uint8)
        start += count
    return stored
