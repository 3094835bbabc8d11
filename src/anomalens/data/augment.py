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

For judging detectors without real defects (`anomalens.evaluation.selection`),
`synthetic_anomalies` adds, besides the two above, two more kinds:

- `crack`: a thin (1-3 pixels per 256) random-walk polyline, darker or lighter than the image by
  a low contrast (15-40 %);
- `blotch_small`, `blotch_medium`, `blotch_large`: an irregular blob (radius 2-5 %, 5-10 % or
  10-18 % of the image side) of noise texture around a shifted local colour, blended in.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from anomalens.errors import ParameterError

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


CRACK_WIDTH = (1 / 256, 3 / 256)
CRACK_CONTRAST = (0.15, 0.4)
BLOTCH_RADIUS = {
    "blotch_small": (0.02, 0.05),
    "blotch_medium": (0.05, 0.1),
    "blotch_large": (0.1, 0.18),
}
SYNTHETIC_KINDS = ("cutpaste", "scar", "crack", *BLOTCH_RADIUS)
"""The kinds `synthetic_anomalies` cycles through, in this order."""


def draw_crack(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A thin random-walk crack drawn, in place, on `image` (3, H, W) in [0, 1]: 4-10 segments of
    2-6 % of the side each, turning by up to 40 degrees, blended towards black or white by a low
    contrast. Returns its (H, W) bool mask."""
    _, rows, cols = image.shape
    side = min(rows, cols)
    y, x = _uniform(0.2, 0.8, generator) * rows, _uniform(0.2, 0.8, generator) * cols
    heading = _uniform(0.0, 2 * math.pi, generator)
    points = [(y, x)]
    for _ in range(int(_uniform(4, 11, generator))):
        heading += math.radians(_uniform(-40.0, 40.0, generator))
        step = _uniform(0.02, 0.06, generator) * side
        y = min(max(y + step * math.sin(heading), 0.0), rows - 1.0)
        x = min(max(x + step * math.cos(heading), 0.0), cols - 1.0)
        points.append((y, x))
    line = torch.zeros((rows, cols), dtype=torch.bool)
    for (y0, x0), (y1, x1) in itertools.pairwise(points):
        count = max(2, math.ceil(2 * math.hypot(y1 - y0, x1 - x0)))
        t = torch.linspace(0.0, 1.0, count, dtype=torch.float64)
        line[(y0 + t * (y1 - y0)).round().long(), (x0 + t * (x1 - x0)).round().long()] = True
    width = max(1, round(_uniform(*CRACK_WIDTH, generator) * side))
    mask = line
    if width > 1:
        grown = F.max_pool2d(line[None, None].float(), 2 * (width // 2) + 1, 1, width // 2)
        mask = grown[0, 0, :rows, :cols] > 0
    target = 0.0 if float(torch.rand((), generator=generator)) < 0.5 else 1.0
    contrast = _uniform(*CRACK_CONTRAST, generator)
    image[:, mask] = image[:, mask] * (1 - contrast) + target * contrast
    return mask


def draw_blotch(
    image: torch.Tensor, radius: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """An irregular blob of coloured noise texture blended, in place, into `image` (3, H, W) in
    [0, 1]; its radius is a fraction in `radius` of the image side. Returns its (H, W) mask."""
    _, rows, cols = image.shape
    side = min(rows, cols)
    size = max(2, round(_uniform(*radius, generator) * side))
    centre_y = round(_uniform(size, rows - size, generator)) if rows > 2 * size else rows // 2
    centre_x = round(_uniform(size, cols - size, generator)) if cols > 2 * size else cols // 2
    top, left = max(0, centre_y - size), max(0, centre_x - size)
    bottom, right = min(rows, centre_y + size + 1), min(cols, centre_x + size + 1)
    box = (bottom - top, right - left)
    y, x = torch.meshgrid(
        (torch.arange(top, bottom) - centre_y) / size,
        (torch.arange(left, right) - centre_x) / size,
        indexing="ij",
    )
    stretch = _uniform(0.6, 1.0, generator)  # an ellipse, at a random angle
    angle = _uniform(0.0, math.pi, generator)
    along = x * math.cos(angle) + y * math.sin(angle)
    across = (-x * math.sin(angle) + y * math.cos(angle)) / stretch
    # A ragged rim: the blob ends where the radius passes 1 - 0.5 * (smooth noise in [0, 1]).
    rim = _smooth_noise(1, 6, box, generator)[0]
    inside = along**2 + across**2 < (1.0 - 0.5 * rim) ** 2
    inside[min(centre_y - top, box[0] - 1), min(centre_x - left, box[1] - 1)] = True
    region = image[:, top:bottom, left:right]
    # The region's mean colour shifted by up to 0.4 per channel, with a +-0.2 noise texture.
    shift = 0.8 * torch.rand(3, 1, 1, generator=generator) - 0.4
    texture = _smooth_noise(3, max(4, size // 3), box, generator) - 0.5
    paint = (region.mean(dim=(1, 2), keepdim=True) + shift + 0.4 * texture).clamp(0.0, 1.0)
    alpha = _uniform(0.4, 0.8, generator)
    region[:, inside] = region[:, inside] * (1 - alpha) + paint[:, inside] * alpha
    mask = torch.zeros((rows, cols), dtype=torch.bool)
    mask[top:bottom, left:right] = inside
    return mask


def _smooth_noise(
    channels: int, cells: int, shape: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """(channels, *shape) noise in [0, 1]: a `cells` x `cells` random grid upsampled bilinearly."""
    grid = torch.rand(1, channels, cells, cells, generator=generator)
    return F.interpolate(grid, size=shape, mode="bilinear", align_corners=False)[0]


def synthetic_anomaly(
    image: torch.Tensor, kind: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthetic defect of `kind` (see `SYNTHETIC_KINDS`) on a copy of `image` (3, H, W) in
    [0, 1]. Returns (image, mask); pixels outside the (H, W) bool mask are unchanged."""
    if kind == "cutpaste":
        images, masks = cutpaste(image[None], generator)
        return images[0], masks[0]
    if kind == "scar":
        images, masks = cutpaste_scar(image[None], generator)
        return images[0], masks[0]
    if kind != "crack" and kind not in BLOTCH_RADIUS:
        raise ParameterError(
            f"unknown synthetic anomaly {kind!r}; expected one of {', '.join(SYNTHETIC_KINDS)}"
        )
    out = image.clone()
    if kind == "crack":
        return out, draw_crack(out, generator)
    return out, draw_blotch(out, BLOTCH_RADIUS[kind], generator)


def synthetic_anomalies(
    images: Sequence[torch.Tensor],
    generator: torch.Generator,
    kinds: Sequence[str] = SYNTHETIC_KINDS,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """One defect on a copy of each image (3, H, W) in [0, 1], its kind cycling through `kinds`.
    Returns (images, masks, kinds); the inputs are left alone."""
    chosen = [kinds[i % len(kinds)] for i in range(len(images))]
    pairs = [
        synthetic_anomaly(image, kind, generator)
        for image, kind in zip(images, chosen, strict=True)
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs], chosen
