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
    """Separable Gaussian smoothing of (B, 1, H, W) maps with reflected borders."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma).to(maps)
    radius = kernel.numel() // 2
    height, width = maps.shape[-2:]
    pad_x, pad_y = min(radius, width - 1), min(radius, height - 1)
    if pad_x < radius or pad_y < radius:
        maps = F.pad(maps, (pad_x, pad_x, pad_y, pad_y), mode="reflect")
        maps = F.pad(maps, (radius - pad_x,) * 2 + (radius - pad_y,) * 2, mode="replicate")
    else:
        maps = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    maps = F.conv2d(maps, kernel.view(1, 1, 1, -1))
    return F.conv2d(maps, kernel.view(1, 1, -1, 1))


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, 1, h, w) maps to `size` = (H, W)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
