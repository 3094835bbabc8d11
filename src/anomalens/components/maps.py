"""Small tensor operations shared by the detectors."""

from __future__ import annotations

import math

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
    reconstruction methods)."""
    shape = (size, size) if isinstance(size, int) else tuple(size)
    return gaussian_blur(resize_maps(scores, shape), sigma)[:, 0]
