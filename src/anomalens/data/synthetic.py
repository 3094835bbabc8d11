"""Deterministic demo datasets built from scikit-image's bundled CC0 textures (no network).

`make_category` writes one texture in the MVTec AD layout: normal images are random crops of
the texture, test defects are a normal crop plus one synthetic `scratch`, `hole`, `stain` or
`foreign` (a patch of another texture) covering roughly 0.5–5 % of the image.
"""

from __future__ import annotations

import functools
import itertools
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image
from scipy import ndimage

from anomalens.data.io import to_rgb_array
from anomalens.errors import DataError, ParameterError

TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")
"""Available textures (``skimage.data`` 512x512 grayscale images)."""

DEFECT_TYPES: tuple[str, ...] = ("scratch", "hole", "stain", "foreign")
"""Synthetic defect kinds, in the order `make_category` cycles through them."""

_TINTS = {"brick": (1.0, 0.66, 0.5), "grass": (0.6, 0.92, 0.45), "gravel": (0.92, 0.88, 0.8)}
_STAIN_COLOURS = np.array(
    [[0.45, 0.25, 0.05], [0.95, 0.85, 0.1], [0.1, 0.3, 0.85], [0.6, 0.1, 0.55], [0.1, 0.6, 0.6]],
    dtype=np.float32,
)
_CROP = 256
"""Side of the texture crop behind every image, so the texture scale is the same everywhere."""


def normal_crop(texture: str, rng: np.random.Generator, image_size: int = 128) -> np.ndarray:
    """A normal ``image_size`` square RGB image: a random, mildly brightness-jittered crop."""
    tex = _texture(texture)
    y, x = rng.integers(0, tex.shape[0] - _CROP + 1, size=2)
    crop = Image.fromarray(tex[y : y + _CROP, x : x + _CROP])
    gray = np.asarray(crop.resize((image_size, image_size), Image.Resampling.BILINEAR))
    gray = gray.astype(np.float32) / 255.0 * rng.uniform(0.94, 1.06)
    return _to_uint8(gray[:, :, None] * np.array(_TINTS[texture], dtype=np.float32))


def add_defect(
    image: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    *,
    foreign_texture: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Add one synthetic defect of ``kind`` at a random position; return ``(image, mask)``.

    The mask (``HxW`` bool) is exactly the changed region: pixels outside it are untouched.
    ``foreign_texture`` is the texture pasted by ``kind="foreign"`` (default: drawn from rng).
    """
    if kind not in DEFECT_TYPES:
        choices = ", ".join(DEFECT_TYPES)
        raise ParameterError(f"unknown defect kind {kind!r}; expected one of {choices}")
    base = to_rgb_array(image)
    img = base.astype(np.float32) / 255.0
    height, width = img.shape[:2]
    if kind == "scratch":
        mask = _scratch_mask(height, width, rng)
        lum = float(img[mask].mean())
        colour = np.full(3, 0.97 if lum < 0.5 else 0.05, dtype=np.float32)
        alpha = np.full((height, width), rng.uniform(0.85, 1.0), dtype=np.float32)
    elif kind == "hole":
        mask, radius = _ellipse(height, width, rng)
        colour = np.full(3, rng.uniform(0.02, 0.08), dtype=np.float32)
        # Opaque core fading to a still clearly visible 0.55 at the rim.
        alpha = np.clip(0.55 + 0.45 * (1.0 - radius) / 0.3, 0.55, 1.0).astype(np.float32)
    elif kind == "stain":
        mask = _blob(height, width, rng, roughness=0.6)
        distance = np.linalg.norm(_STAIN_COLOURS - img[mask].mean(axis=0), axis=1)
        colour = _STAIN_COLOURS[rng.choice(np.argsort(distance)[-2:])]
        alpha = rng.uniform(0.5, 0.7) * (0.8 + 0.2 * np.tanh(_noise(height, width, 2.0, rng)))
    else:
        mask = _blob(height, width, rng, roughness=1.0)
        name = foreign_texture or str(rng.choice(TEXTURES))
        colour = _foreign_patch(name, height, width, rng)
        alpha = np.ones((height, width), dtype=np.float32)
    blended = img * (1.0 - alpha[:, :, None]) + colour * alpha[:, :, None]
    out = np.where(mask[:, :, None], _to_uint8(blended), base)
    return np.ascontiguousarray(out), mask


def make_category(
    root: str | os.PathLike[str],
    texture: str = "brick",
    *,
    seed: int = 0,
    n_train: int = 30,
    n_test_good: int = 8,
    n_test_defect: int = 16,
    image_size: int = 128,
) -> Path:
    """Write ``root/<texture>`` in the MVTec AD layout and return that folder.

    The same arguments always produce byte-identical PNG files. Defects cycle through
    `DEFECT_TYPES`; masks are ``ground_truth/<defect>/<stem>_mask.png`` with values 0/255.
    """
    if texture not in TEXTURES:
        raise ParameterError(f"unknown texture {texture!r}; expected one of {', '.join(TEXTURES)}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0 or image_size < 32:
        raise ParameterError(
            "need n_train >= 1, n_test_good >= 0, n_test_defect >= 0, image_size >= 32"
        )
    category = Path(root) / texture
    if category.exists() and (not category.is_dir() or any(category.iterdir())):
        raise DataError(f"cannot create demo data in {category}: it already exists")
    rng = np.random.default_rng([seed, zlib.crc32(texture.encode())])
    others = [t for t in TEXTURES if t != texture]

    for i in range(n_train):
        _save(normal_crop(texture, rng, image_size), category / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save(normal_crop(texture, rng, image_size), category / "test" / "good" / f"{i:03d}.png")
    counts = dict.fromkeys(DEFECT_TYPES, 0)
    for i in range(n_test_defect):
        kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        base = normal_crop(texture, rng, image_size)
        foreign = str(rng.choice(others))
        image, mask = add_defect(base, kind, rng, foreign_texture=foreign)
        stem = f"{counts[kind]:03d}"
        counts[kind] += 1
        _save(image, category / "test" / kind / f"{stem}.png")
        _save(mask.astype(np.uint8) * 255, category / "ground_truth" / kind / f"{stem}_mask.png")
    return category


def make_dataset(
    root: str | os.PathLike[str],
    textures: Sequence[str] = TEXTURES,
    *,
    seed: int = 0,
    n_train: int = 30,
    n_test_good: int = 8,
    n_test_defect: int = 16,
    image_size: int = 128,
) -> list[Path]:
    """Write one `make_category` folder per texture under ``root``; return their paths."""
    return [
        make_category(
            root,
            texture,
            seed=seed,
            n_train=n_train,
            n_test_good=n_test_good,
            n_test_defect=n_test_defect,
            image_size=image_size,
        )
        for texture in textures
    ]


@functools.cache
def _texture(name: str) -> np.ndarray:
    """The named texture as ``uint8``, contrast-stretched (1st–99th percentile) and read-only."""
    if name not in TEXTURES:
        raise ParameterError(f"unknown texture {name!r}; expected one of {', '.join(TEXTURES)}")
    tex = getattr(skimage.data, name)().astype(np.float32)
    low, high = np.percentile(tex, [1, 99])
    out = _to_uint8(np.clip((tex - low) / (high - low), 0, 1) * 0.9 + 0.05)
    out.flags.writeable = False
    return out


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _noise(height: int, width: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth Gaussian noise with unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal((height, width)), sigma)
    return (field / (field.std() + 1e-12)).astype(np.float32)


def _scratch_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A thin polyline of 1–3 segments with a total length of 50–75 % of the shorter side."""
    side = min(height, width)
    half_width = max(0.75, rng.uniform(1.0, 2.0) * side / 128)
    n_segments = int(rng.integers(1, 4))
    step = rng.uniform(0.5, 0.75) * side / n_segments
    angles = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.5, size=n_segments))
    steps = step * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    points = np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    # Place the whole polyline at a random position inside the image (nothing is clipped).
    low = 1 + half_width - points.min(axis=0)
    high = np.array([width, height]) - 2 - half_width - points.max(axis=0)
    points += rng.uniform(low, np.maximum(low, high))
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx, yy], axis=-1).astype(np.float64)
    mask = np.zeros((height, width), dtype=bool)
    for start, end in itertools.pairwise(points):
        t = np.clip((pixels - start) @ (end - start) / step**2, 0.0, 1.0)
        distance = np.linalg.norm(pixels - start - t[..., None] * (end - start), axis=-1)
        mask |= distance <= half_width
    return mask


def _ellipse(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A rotated filled ellipse of 1–3 % of the image; returns (mask, normalised radius)."""
    area = rng.uniform(0.01, 0.03) * height * width
    aspect = rng.uniform(0.6, 1.0)
    semi_a = np.sqrt(area / (np.pi * aspect))
    semi_b = semi_a * aspect
    margin = semi_a + 1
    cy = rng.uniform(margin, max(margin, height - margin))
    cx = rng.uniform(margin, max(margin, width - margin))
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    radius = np.sqrt((u / semi_a) ** 2 + (v / semi_b) ** 2)
    return radius <= 1.0, radius


def _blob(height: int, width: int, rng: np.random.Generator, roughness: float) -> np.ndarray:
    """An irregular blob of exactly 1–3.5 % of the image: the top pixels of a noisy disc score."""
    n_pixels = max(1, round(rng.uniform(0.01, 0.035) * height * width))
    radius = np.sqrt(n_pixels / np.pi)
    margin = 1.5 * radius
    cy = rng.uniform(margin, max(margin, height - margin))
    cx = rng.uniform(margin, max(margin, width - margin))
    yy, xx = np.mgrid[0:height, 0:width]
    score = -((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2
    score += roughness * _noise(height, width, max(1.0, radius / 3), rng)
    threshold = np.partition(score.ravel(), -n_pixels)[-n_pixels]
    return score >= threshold


def _foreign_patch(name: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A tinted, randomly rotated crop of texture ``name`` covering the whole image."""
    tex = np.rot90(_texture(name), k=int(rng.integers(0, 4)))
    y, x = rng.integers(0, tex.shape[0] - _CROP + 1, size=2)
    crop = Image.fromarray(np.ascontiguousarray(tex[y : y + _CROP, x : x + _CROP]))
    gray = np.asarray(crop.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    return gray[:, :, None] / 255.0 * np.array(_TINTS[name], dtype=np.float32)
