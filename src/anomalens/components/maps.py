"""Small tensor operations shared by the detectors."""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel truncated at 4 sigma (odd length)."""
    radius = max(1, math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, C, H, W) maps, each channel alone, reflected borders.

    All B x C planes go through one depthwise convolution (groups = planes), which on a CPU is an
    order of magnitude faster than a single-channel convolution over a batch of planes.
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma).to(maps)
    radius = kernel.numel() // 2
    shape = maps.shape
    height, width = shape[-2:]
    planes = maps.reshape(1, -1, height, width)
    pad_x, pad_y = min(radius, width - 1), min(radius, height - 1)
    if pad_x < radius or pad_y < radius:
        planes = F.pad(planes, (pad_x, pad_x, pad_y, pad_y), mode="reflect")
        planes = F.pad(planes, (radius - pad_x,) * 2 + (radius - pad_y,) * 2, mode="replicate")
    else:
        planes = F.pad(planes, (radius, radius, radius, radius), mode="reflect")
    if torch.compiler.is_exporting():
        # ONNX needs a fixed group count; the batch size of an exported graph is dynamic.
        planes = planes.reshape(-1, 1, *planes.shape[-2:])
        planes = F.conv2d(planes, kernel.view(1, 1, 1, -1))
        planes = F.conv2d(planes, kernel.view(1, 1, -1, 1))
        return planes.reshape(shape)
    count = planes.shape[1]
    planes = F.conv2d(planes, kernel.view(1, 1, 1, -1).expand(count, 1, 1, -1), groups=count)
    planes = F.conv2d(planes, kernel.view(1, 1, -1, 1).expand(count, 1, -1, 1), groups=count)
    return planes.reshape(shape)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, 1, h, w) maps to `size` = (H, W)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def anomaly_maps(
    scores: torch.Tensor, size: int | tuple[int, int] | torch.Size, sigma: float
) -> torch.Tensor:
    """(B, 1, h, w) coarse anomaly scores -> (B, H, W) maps at `size` (H, W), or size x size:
    bilinear upsampling, then Gaussian smoothing (the post-processing of PatchCore, PaDiM and the
    reconstruction methods).

    Both steps are linear and separable, so they run as one small matrix per axis,
    rows @ map @ columns.T: the same maps to float rounding, ~10x faster than the upsampling and
    the two convolutions in PatchCore's predict (32 -> 256 px), in torch and in an exported graph
    of fixed size alike. A graph whose size is symbolic (`resize="keep"`) keeps the convolutions,
    which need no matrix built for its input size."""
    shape = (size, size) if isinstance(size, int) else tuple(size)
    height, width = scores.shape[-2:]
    # Symbolic sizes are not compared (that would tie them to the example's while exporting).
    if all(isinstance(value, int) for value in (height, width, *shape)):
        rows = axis_matrix(height, shape[0], sigma)
        square = (width, shape[1]) == (height, shape[0])
        columns = rows if square else axis_matrix(width, shape[1], sigma)
        if rows is not None and columns is not None:
            return rows.to(scores) @ scores[:, 0] @ columns.to(scores).T
    return gaussian_blur(resize_maps(scores, shape), sigma)[:, 0]


_AXIS_MATRICES: dict[tuple[int, int, float], torch.Tensor] = {}
_AXIS_MATRICES_LOCK = threading.Lock()
AXIS_MATRICES_KEPT = 16


def axis_matrix(size: int, new_size: int, sigma: float) -> torch.Tensor | None:
    """(new_size, size) matrix: `resize_maps` then `gaussian_blur` along one axis, a constant of
    its arguments kept for the next call (building it costs as much as using it). While a graph
    is exported, the one built by an eager call before (`anomalens.deploy.export` makes one), so
    that it enters the graph as a constant, or None where there is none."""
    key = (int(size), int(new_size), float(sigma))
    if torch.compiler.is_exporting():
        return _AXIS_MATRICES.get(key)
    with _AXIS_MATRICES_LOCK:  # the service scores on several threads
        if key not in _AXIS_MATRICES:
            if len(_AXIS_MATRICES) >= AXIS_MATRICES_KEPT:
                del _AXIS_MATRICES[next(iter(_AXIS_MATRICES))]
            _AXIS_MATRICES[key] = _resize_and_smooth(*key)
        return _AXIS_MATRICES[key]


@torch.inference_mode(False)  # a plain tensor, usable with autograd whoever first built it
def _resize_and_smooth(size: int, new_size: int, sigma: float) -> torch.Tensor:
    matrix = smoothing_matrix(new_size, sigma)
    return matrix if size == new_size else matrix @ resize_matrix(size, new_size)


def smoothing_matrix(size: int, sigma: float) -> torch.Tensor:
    """(size, size) matrix of `gaussian_blur` along one axis: reflected borders, and past one
    reflection (an axis shorter than the kernel's radius) the edge value repeated."""
    if sigma <= 0:
        return torch.eye(size)
    kernel = gaussian_kernel1d(sigma)
    radius = kernel.numel() // 2
    last = size - 1
    taps = torch.arange(size)[:, None] + torch.arange(-radius, radius + 1)
    taps = torch.where(taps < 0, (-taps).clamp(max=last), taps)
    taps = torch.where(taps > last, (2 * last - taps).clamp(min=0), taps)
    return torch.zeros(size, size).scatter_add_(1, taps, kernel.expand_as(taps))


def resize_matrix(size: int, new_size: int) -> torch.Tensor:
    """(new_size, size) matrix of `resize_maps` (bilinear, align_corners=False) along one axis."""
    identity = torch.eye(size)[None]
    return F.interpolate(identity, size=new_size, mode="linear", align_corners=False)[0].T
