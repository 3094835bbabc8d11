"""CutPaste synthetic defects (Li, Sohn, Yoon & Pfister, "CutPaste: Self-Supervised Learning for
Anomaly Detection and Localization", CVPR 2021, sec. 3.1), made at training time on batches.

- `cutpaste`: cut a rectangle of 2-15 % of the image with an aspect ratio in [0.3, 3.3], jitter
  its colour, paste it at another random position of the same image.
- `cutpaste_scar`: the same with a long thin rectangle (the paper's 2-16 x 10-25 pixels of a
  256-pixel image, scaled to the image size) rotated by up to 45 degrees either way.

Colour jitter: brightness, contrast and saturation each by up to +-`jitter` (the paper's 0.1; its
hue jitter is left out). Everything random comes from the `torch.Generator` passed in, so the same
seed gives the same defects. Unlike `anomalens.data.synthetic` (fixed demo test sets), these
defects are what a self-supervised detector learns to tell apart from normal images.
"""

from __future__ import annotations

import math

import torch

AREA = (0.02, 0.15)
ASPECT = (0.3, 3.3)
SCAR_WIDTH = (2 / 256, 16 / 256)
SCAR_LENGTH = (10 / 256, 25 / 256)
SCAR_ANGLE = 45.0
JITTER = 0.1


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def colour_jitter(pixels: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """(3, K) pixels in [0, 1]: random brightness, contrast and saturation factors in 1 +- amount
    (contrast about the pixels' mean, saturation about each pixel's grey value)."""
    brightness, contrast, saturation = (
        _uniform(1 - amount, 1 + amount, generator) for _ in range(3)
    )
    pixels = pixels * brightness
    mean = pixels.mean()
    pixels = (pixels - mean) * contrast + mean
    gray = pixels.mean(dim=0, keepdim=True)
    return ((pixels - gray) * saturation + gray).clamp(0.0, 1.0)


def paste_patch(
    image: torch.Tensor,
    height: float,
    width: float,
    angle: float,
    jitter: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Cut a `height` x `width` pixel rectangle at a random place of `image` (3, H, W), jitter its
    colour, rotate it by `angle` degrees and paste it, in place, at another random place.

    Returns the (H, W) bool mask of the pasted pixels (all others are unchanged). Only the
    patch's bounding box is computed on, so a small patch costs little on a large image.
    """
    _, rows, cols = image.shape
    height, width = min(max(height, 1.0), rows - 1.0), min(max(width, 1.0), cols - 1.0)
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    # Half extents of the rotated rectangle's bounding box, so the pasted patch lies inside.
    extent_y = min(abs(sin) * width / 2 + abs(cos) * height / 2, rows / 2)
    extent_x = min(abs(cos) * width / 2 + abs(sin) * height / 2, cols / 2)
    source_y = _uniform(height / 2, rows - height / 2, generator)
    source_x = _uniform(width / 2, cols - width / 2, generator)
    target_y = _uniform(extent_y, rows - extent_y, generator)
    target_x = _uniform(extent_x, cols - extent_x, generator)
    top, left = math.floor(target_y - extent_y), math.floor(target_x - extent_x)
    bottom, right = math.ceil(target_y + extent_y), math.ceil(target_x + extent_x)
    y, x = torch.meshgrid(
        torch.arange(top, bottom, dtype=torch.float64) + 0.5,
        torch.arange(left, right, dtype=torch.float64) + 0.5,
        indexing="ij",
    )
    dy, dx = y - target_y, x - target_x
    along_width = cos * dx + sin * dy  # the target pixel in the patch's own frame
    along_height = -sin * dx + cos * dy
    inside = (along_width.abs() < width / 2) & (along_height.abs() < height / 2)
    source_rows = (source_y + along_height[inside]).floor().long().clamp(0, rows - 1)
    source_cols = (source_x + along_width[inside]).floor().long().clamp(0, cols - 1)
    patch = colour_jitter(image[:, source_rows, source_cols], jitter, generator)
    image[:, top:bottom, left:right][:, inside] = patch
    mask = torch.zeros((rows, cols), dtype=torch.bool)
    mask[top:bottom, left:right] = inside
    return mask


def cutpaste(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    area: tuple[float, float] = AREA,
    aspect: tuple[float, float] = ASPECT,
    jitter: float = JITTER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste on each image of (B, 3, H, W) in [0, 1]: a rectangle of `area` (fraction of the
    image) and `aspect` (height / width, log-uniform) pasted elsewhere. Returns (images, masks)."""
    out = images.clone()
    rows, cols = images.shape[-2:]
    masks = []
    for image in out:
        size = _uniform(*area, generator) * rows * cols
        ratio = math.exp(_uniform(math.log(aspect[0]), math.log(aspect[1]), generator))
        width = math.sqrt(size / ratio)
        masks.append(paste_patch(image, width * ratio, width, 0.0, jitter, generator))
    return out, torch.stack(masks)


def cutpaste_scar(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    width: tuple[float, float] = SCAR_WIDTH,
    length: tuple[float, float] = SCAR_LENGTH,
    max_angle: float = SCAR_ANGLE,
    jitter: float = JITTER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste-Scar on each image of (B, 3, H, W) in [0, 1]: a thin rectangle (`width` and
    `length` as fractions of the image side) rotated by up to `max_angle` degrees, pasted
    elsewhere. Returns (images, masks)."""
    out = images.clone()
    side = min(images.shape[-2:])
    masks = []
    for image in out:
        scar_width = _uniform(*width, generator) * side
        scar_length = _uniform(*length, generator) * side
        angle = _uniform(-max_angle, max_angle, generator)
        masks.append(paste_patch(image, scar_length, scar_width, angle, jitter, generator))
    return out, torch.stack(masks)
