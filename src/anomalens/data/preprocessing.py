"""Turning user images (paths, PIL images, arrays) into model-sized tensors, in streamed batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anomalens.data.io import image_shape, to_rgb_array
from anomalens.errors import ParameterError
from anomalens.progress import make_progress

ImageLike = str | PathLike | np.ndarray | Any
"""A path to an image file, a PIL image, or a uint8/uint16/float/bool array (HxW or HxWxC)."""


RESIZE_MODES = ("squash", "keep", "letterbox")
"""How an image reaches the model: `squash` to size x size (aspect ratio not kept), `keep` (short
side to size, the aspect ratio kept, a non-square input), `letterbox` (long side to size, padded
to a square with mid-grey, which the network's own normalisation maps to zero)."""

RESIZE_AUTO = "auto"
"""A `resize` that `resolve_resize` decides at fit from the training images' shapes."""
ELONGATED_ASPECT = 1.5
"""`auto` keeps the aspect ratio of training images that all share one shape at least this far
from square (long side / short side)."""
SAME_SHAPE_TOLERANCE = 0.05
"""Largest relative spread of the training images' width / height that still counts as one
shape."""
SHAPE_SAMPLE = 64
"""Training images (evenly spaced) whose shapes `resolve_resize` reads."""

KEEP_MULTIPLE = 32
"""`keep` rounds both sides to a multiple of the deepest backbone stride, so every feature map
covers the image exactly."""

LETTERBOX_FILL = 0.5

INTENSITY_MODES = ("raw", "standardize")
"""What the feature extractor sees of an image's brightness: `raw` (the pixels as they are) or
`standardize` (each image shifted and scaled to the same mean and spread of intensity, so that
exposure and illumination that vary from image to image are not learnt as normal variety, nor
flagged; `normalize_intensity`)."""

STANDARD_MEAN = 0.5
STANDARD_SPREAD = 40 / 255
"""`standardize`'s target mean and standard deviation of an image's intensities (in [0, 1]): a
mid-grey of moderate contrast, which keeps all but about 0.1% of a normal image's pixels
inside [0, 1]."""


@dataclass(frozen=True)
class Batch:
    """Images resized to the model's input, with their original sizes (H, W) and, per image, the
    (top, left, height, width) box of `pixels` that holds the image (all of it unless
    letterboxed)."""

    pixels: torch.Tensor
    sizes: list[tuple[int, int]]
    boxes: list[tuple[int, int, int, int]]


def normalize_intensity(images: torch.Tensor, mode: str, letterboxed: bool = False) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> the same with each image's intensity `standardize`d (its mean
    and standard deviation over all pixels and channels set to `STANDARD_MEAN` and
    `STANDARD_SPREAD`, clipped to [0, 1]; colour ratios and local contrast kept), or unchanged
    for `raw`. Per-image illumination normalisation, as in classical machine-vision inspection
    under varying exposure; a defect is local, so it stands out the same way after it.
    `letterboxed`: pixels of exactly `LETTERBOX_FILL` in every channel are padding, left out of
    the statistics and left as they are."""
    if mode == "raw":
        return images
    if letterboxed:
        inside = (images != LETTERBOX_FILL).any(dim=1, keepdim=True).to(images.dtype)
    else:
        inside = torch.ones_like(images[:, :1])
    count = (inside.sum(dim=(1, 2, 3), keepdim=True) * images.shape[1]).clamp_min(1.0)
    mean = (images * inside).sum(dim=(1, 2, 3), keepdim=True) / count
    spread = (((images - mean) * inside).square().sum(dim=(1, 2, 3), keepdim=True) / count).sqrt()
    scale = STANDARD_SPREAD / (spread + 1e-3)
    standard = ((images - mean) * scale + STANDARD_MEAN).clamp(0.0, 1.0)
    return torch.where(inside > 0, standard, images) if letterboxed else standard


def resolve_resize(mode: str, images: Sequence[ImageLike]) -> str:
    """`mode` itself unless it is `auto`; then `keep` when the training `images` share one shape
    (width / height within `SAME_SHAPE_TOLERANCE`) at least `ELONGATED_ASPECT` from square, such
    as a line camera's strips, and `squash` otherwise. Squashing a 500 x 1260 strip to 256 x 256
    shrinks it 5x along its length, and a thin defect across it with it (synthetic cracks on
    strips: image AUROC 0.50 squashed, 0.67 kept; benchmarks/RESULTS.md); a set of many shapes
    (magnetic tile) was not better kept, and it batches badly."""
    if mode != RESIZE_AUTO:
        return mode
    step = max(1, len(images) // SHAPE_SAMPLE)
    ratios = [width / height for height, width in map(image_shape, images[::step])]
    if not ratios:
        return "squash"
    low, high = min(ratios), max(ratios)
    one_shape = high <= low * (1 + SAME_SHAPE_TOLERANCE)
    elongated = low >= ELONGATED_ASPECT or high <= 1 / ELONGATED_ASPECT
    return "keep" if one_shape and elongated else "squash"


def check_resize(mode: str, supported: Sequence[str] = RESIZE_MODES) -> str:
    """`mode` itself if it is one of `supported`, else a `ParameterError` naming the choices."""
    if mode not in supported:
        raise ParameterError(f"resize must be one of {', '.join(supported)}; got {mode!r}")
    return mode


def input_shape(height: int, width: int, size: int, mode: str) -> tuple[int, int]:
    """The (height, width) an image of `height` x `width` is resized to before padding."""
    if mode == "squash":
        return size, size
    scale = size / (min(height, width) if mode == "keep" else max(height, width))
    if mode == "keep":
        return (
            max(KEEP_MULTIPLE, round(height * scale / KEEP_MULTIPLE) * KEEP_MULTIPLE),
            max(KEEP_MULTIPLE, round(width * scale / KEEP_MULTIPLE) * KEEP_MULTIPLE),
        )
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(
    image: np.ndarray, size: int, mode: str = "squash"
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """HxWx3 uint8 array -> float tensor (3, h, w) in [0, 1] (bilinear, antialiased) and the box
    of it that holds the image; `letterbox` centres the image on a size x size grey square."""
    tensor = torch.from_numpy(np.require(image, requirements=["C", "W"]))
    tensor = tensor.permute(2, 0, 1)[None].float()
    height, width = input_shape(*image.shape[:2], size, mode)
    if tuple(tensor.shape[-2:]) != (height, width):
        tensor = F.interpolate(
            tensor, size=(height, width), mode="bilinear", antialias=True, align_corners=False
        )
    tensor = (tensor[0] / 255.0).clamp_(0.0, 1.0)
    if mode != "letterbox":
        return tensor, (0, 0, height, width)
    top, left = (size - height) // 2, (size - width) // 2
    canvas = torch.full((3, size, size), LETTERBOX_FILL)
    canvas[:, top : top + height, left : left + width] = tensor
    return canvas, (top, left, height, width)


def resize_to_tensor(images: Sequence[np.ndarray], size: int, mode: str = "squash") -> torch.Tensor:
    """HxWx3 uint8 arrays of one resized shape -> float tensor (B, 3, h, w) in [0, 1]."""
    return torch.stack([resize_image(image, size, mode)[0] for image in images])


def iter_batches(
    images: Sequence[ImageLike],
    size: int,
    batch_size: int,
    progress: str | None = None,
    mode: str = "squash",
    threads: int | None = None,
) -> Iterator[Batch]:
    """Load and resize images lazily, `batch_size` at a time, so memory stays flat; with a
    `progress` label, a progress bar counts the images done. A thread decodes and resizes the next
    batch while the caller works on this one (with torch's intra-op `threads`; None: the
    default). With `keep`, a batch holds consecutive images of the same resized shape (a folder
    of one camera's images batches fully; mixed shapes are scored in
    smaller batches), in the input order."""
    chunks = [images[start : start + batch_size] for start in range(0, len(images), batch_size)]
    if not chunks:
        return
    with make_progress() as bar:
        task = bar.add_task(
            progress or "", total=len(images), info="", unit="img", visible=bool(progress)
        )
        for batches, count in _loaded(chunks, size, mode, threads):
            yield from batches
            bar.advance(task, count)


def _loaded(
    chunks: list[Sequence[ImageLike]], size: int, mode: str, threads: int | None = None
) -> Iterator[tuple[list[Batch], int]]:
    """`_load_batch` of each chunk, the next one in a thread while the caller works on this one.
    A single chunk is loaded inline: there is nothing to overlap, and a fresh thread's first torch
    call (its own thread pool) cost ~9 ms per batch-1 predict."""
    if len(chunks) == 1:
        yield _load_batch(chunks[0], size, mode)
        return
    setup: dict[str, Any] = {}
    if threads is not None:
        setup = {"initializer": torch.set_num_threads, "initargs": (threads,)}
    with ThreadPoolExecutor(1, thread_name_prefix="anomalens-decode", **setup) as decoder:
        pending = decoder.submit(_load_batch, chunks[0], size, mode)
        for following in [*chunks[1:], None]:
            loaded = pending.result()
            if following is not None:
                pending = decoder.submit(_load_batch, following, size, mode)
            yield loaded


def _load_batch(images: Sequence[ImageLike], size: int, mode: str) -> tuple[list[Batch], int]:
    """`images` read and resized, as batches of one resized shape each, and how many there were."""
    arrays = [to_rgb_array(image) for image in images]
    resized = [resize_image(array, size, mode) for array in arrays]
    batches, run = [], 0
    for end in range(1, len(arrays) + 1):
        if end == len(arrays) or resized[end][0].shape != resized[run][0].shape:
            batches.append(
                Batch(
                    torch.stack([tensor for tensor, _ in resized[run:end]]),
                    [a.shape[:2] for a in arrays[run:end]],
                    [box for _, box in resized[run:end]],
                )
            )
            run = end
    return batches, len(arrays)


def load_resized(
    images: Sequence[ImageLike], size: int, batch_size: int = 32, mode: str = "squash"
) -> torch.Tensor:
    """All images resized to `size` (`squash` or `letterbox`) as one uint8 tensor
    (N, 3, size, size), for methods that train for many epochs (1,000 images at 256 px take
    200 MB)."""
    stored = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    start = 0
    for batch in iter_batches(images, size, batch_size, "loading images", mode):
        count = len(batch.sizes)
        stored[start : start + count] = (batch.pixels * 255).round().to(torch.uint8)
        start += count
    return stored
