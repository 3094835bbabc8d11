"""Reading images and masks from disk or memory into plain numpy arrays.

Every image becomes an ``HxWx3`` ``uint8`` RGB array and every mask an ``HxW`` ``bool`` array.
Transparency is handled by compositing onto black (``rgb * alpha``), so fully transparent pixels
always read as black whatever colour they happen to store.
"""

from __future__ import annotations

import base64
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anomalens.errors import DataError, ImageReadError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
"""Suffixes (compared case-insensitively) that `list_images` treats as images."""

MAX_IMAGE_PIXELS = 150_000_000
"""Images with more pixels are refused before decoding (decompression-bomb guard).

It sits below Pillow's default hard limit (about 179 M pixels), so it is the limit that binds;
Pillow's own `DecompressionBombError` is reported the same way should its limit be lower.
"""

_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
"""EXIF orientations that swap width and height (`load_image` applies them)."""
"""Pillow plugins allowed to decode files (no EPS/PDF and other formats that run tools)."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

ImageLike = str | os.PathLike[str] | Image.Image | np.ndarray


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as a contiguous ``HxWx3`` ``uint8`` RGB array.

    EXIF orientation is applied. Grayscale, 16-bit grayscale (scaled by 1/257), 1-bit, palette,
    CMYK and images with alpha (composited onto black) are all converted to RGB; 32-bit float
    images are taken to lie in ``[0, 1]``.
    """
    return _read(path, _pil_to_rgb)


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file held in memory (an upload) like `load_image`; `name` is what error
    messages call it, and images of more than `max_pixels` (default `MAX_IMAGE_PIXELS`) are
    refused before decoding."""
    return _read(io.BytesIO(data), _pil_to_rgb, name=name, max_pixels=max_pixels)


def load_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a mask file as an ``HxW`` bool array: any nonzero (non-transparent) pixel is True."""
    return _read(path, _pil_to_mask)


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Convert a path, a PIL image or a numpy array to a contiguous ``HxWx3`` ``uint8`` array.

    Arrays may be ``HxW``, ``HxWx1``, ``HxWx3`` or ``HxWx4`` (alpha composited onto black) with
    dtype ``uint8``, ``uint16`` (scaled by 1/257), ``bool`` or float in ``[0, 1]`` (scaled by 255,
    rounded and clipped).
    """
    if isinstance(image, str | os.PathLike):
        return load_image(image)
    if isinstance(image, Image.Image):
        try:
            image.load()
            return _pil_to_rgb(image)
        except ImageReadError:
            raise
        except Exception as exc:  # Pillow raises many types for broken images
            name = f"<PIL image mode={image.mode} size={image.size}>"
            raise ImageReadError(f"cannot read image {name}: {_reason(exc)}") from exc
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise ImageReadError(
        f"cannot convert {type(image).__name__} to an image; expected a path, PIL image or array"
    )


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted by name.

    Hidden files (names starting with ``.``, such as macOS ``._x.png`` forks) are skipped;
    dangling links are listed, so that reading them reports them.
    """
    folder = Path(folder)
    images = _image_files(folder)
    if not images:
        expected = ", ".join(IMAGE_EXTENSIONS)
        raise DataError(f"no images in {folder}; expected files ending in {expected}")
    return images


def _image_files(folder: Path) -> list[Path]:
    """Like `list_images` but returns an empty list for a folder without images."""
    if not folder.exists():
        raise DataError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder} is not a directory")
    try:
        entries = list(folder.iterdir())
    except OSError as error:
        raise DataError(f"cannot read folder {folder}: {error.strerror or error}") from error
    # A dangling link stays in the list: reading it then says so, rather than dropping it.
    files = (
        p
        for p in entries
        if not p.name.startswith(".")
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and (p.is_file() or (p.is_symlink() and not p.exists()))
    )
    return sorted(files, key=lambda p: p.name)


def image_shape(image: ImageLike) -> tuple[int, int]:
    """(height, width) of an image as `to_rgb_array` would load it, reading only the header of
    files (with EXIF orientation applied)."""
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    if isinstance(image, str | os.PathLike):
        try:
            with Image.open(image) as opened:
                width, height = opened.size
                orientation = opened.getexif().get(0x0112)
        except Exception:  # unreadable: let the full read raise its one clear error
            return to_rgb_array(image).shape[:2]
        if orientation in _TRANSPOSING_ORIENTATIONS:
            return width, height
        return height, width
    return to_rgb_array(image).shape[:2]


def dangling_link(path: str | os.PathLike[str]) -> str:
    """How errors describe a link whose target is gone."""
    return f"dangling link to {os.readlink(path)}"


def _read(
    source: str | os.PathLike[str] | io.BytesIO,
    convert: Callable[[Image.Image], np.ndarray],
    name: str | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Open, fully decode and orient an image file, then ``convert`` it; map failures."""
    path = source if name is None else name
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            # We enforce MAX_IMAGE_PIXELS ourselves; Pillow's lower warning threshold is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source, formats=_FORMATS) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise ImageReadError(
                        f"cannot read image {path}: {width}x{height} pixels exceeds the limit of "
                        f"{max_pixels} (possible decompression bomb)"
                    )
                im.load()
                return convert(im)
    except ImageReadError:
        raise
    except FileNotFoundError as exc:
        broken = isinstance(path, str | os.PathLike) and os.path.islink(path)
        reason = dangling_link(path) if broken else "file not found"
        raise ImageReadError(f"cannot read image {path}: {reason}") from exc
    except IsADirectoryError as exc:
        raise ImageReadError(f"cannot read image {path}: is a directory") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"cannot read image {path}: not a supported image file") from exc
    except Exception as exc:  # truncated data, Pillow's bomb check, bad EXIF, codec errors...
        raise ImageReadError(f"cannot read image {path}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """One-line description of an exception."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image (any mode) to ``HxWx3`` ``uint8`` after EXIF orientation."""
    im = ImageOps.exif_transpose(im)
    if im.mode in _SIXTEEN_BIT_MODES or im.mode == "F":
        return _array_to_rgb(np.asarray(im))
    if im.mode == "I":  # 32-bit container used for 16-bit data
        return _array_to_rgb(np.clip(np.asarray(im), 0, 65535).astype(np.uint16))
    if im.has_transparency_data:
        return _array_to_rgb(np.asarray(im.convert("RGBA")))
    return _array_to_rgb(np.asarray(im.convert("RGB")))


def _pil_to_mask(im: Image.Image) -> np.ndarray:
    """Nonzero pixels of a decoded PIL image (transparent pixels count as zero)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("1", "L", "I", "F", *_SIXTEEN_BIT_MODES):
        return np.asarray(im) != 0
    rgba = np.asarray(im.convert("RGBA"))
    return rgba[..., :3].any(axis=-1) & (rgba[..., 3] > 0)


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """Convert an ``HxW[xC]`` array of a supported dtype to ``HxWx3`` ``uint8``."""
    shape_ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))
    if not shape_ok or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(
            f"cannot convert array of shape {arr.shape}: expected HxW, HxWx1, HxWx3 or HxWx4"
        )
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * np.uint8(255)
    elif arr.dtype == np.uint16:
        out = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if np.isnan(arr).any():
            raise ImageReadError(f"cannot convert array of shape {arr.shape}: contains NaN")
        out = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    else:
        raise ImageReadError(
            f"cannot convert array of dtype {arr.dtype}: expected uint8, uint16, bool or float"
        )
    if out.ndim == 2:
        out = out[:, :, None]
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    elif out.shape[2] == 4:
        alpha = out[:, :, 3:].astype(np.uint16)
        out = ((out[:, :, :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(out)


def region_of_interest(roi: str | os.PathLike[str] | np.ndarray | Image.Image) -> np.ndarray:
    """A region-of-interest mask (a mask file, a PIL image or an array; nonzero = inspect) as an
    ``HxW`` bool array; an empty region is an error."""
    if isinstance(roi, str | os.PathLike):
        mask = load_mask(roi)
    elif isinstance(roi, Image.Image):
        mask = _pil_to_mask(roi)
    else:
        mask = np.asarray(roi)
        mask = (mask.any(axis=-1) if mask.ndim == 3 else mask) != 0
    if mask.ndim != 2 or not mask.any():
        raise DataError(f"the region of interest must be a non-empty 2-D mask, got {mask.shape}")
    return mask


def stretch_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A bool mask resized to `shape` (H, W) by nearest-neighbour sampling."""
    height, width = shape
    if mask.shape == (height, width):
        return mask
    rows = np.minimum(
        ((np.arange(height) + 0.5) * mask.shape[0] / height).astype(int), mask.shape[0] - 1
    )
    cols = np.minimum(
        ((np.arange(width) + 0.5) * mask.shape[1] / width).astype(int), mask.shape[1] - 1
    )
    return mask[rows][:, cols]


def encode_mask(mask: np.ndarray) -> str:
    """A bool mask as base64 PNG text (to keep it in a JSON config)."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_mask(text: str) -> np.ndarray:
    """The bool mask of `encode_mask`'s text."""
    return _read(io.BytesIO(base64.b64decode(text)), _pil_to_mask, name="stored mask")
