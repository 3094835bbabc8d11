"""What the reconstruction detectors share: residual maps, SSIM, and image scores from a map.

Residual maps (Bergmann et al., "Improving unsupervised defect segmentation by applying structural
similarity to autoencoders", VISAPP 2019): per-pixel `l1` |x - x̂|, `l2` (x - x̂)², or `ssim`
1 - SSIM(x, x̂) over a Gaussian window (sigma 1.5, as Wang et al. 2004), which reacts to changed
structure rather than to the small intensity errors a blurry reconstruction makes everywhere.
"""

from __future__ import annotations

import torch

from anomalens.components.maps import gaussian_blur
from anomalens.errors import ParameterError, check_choice

RESIDUALS = ("l1", "l2", "ssim")
IMAGE_SCORES = ("max", "top_k")


def ssim(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM (B, 1, H, W) of two (B, C, H, W) images in [0, 1], averaged over channels."""
    c1, c2 = 0.01**2, 0.03**2
    moments = gaussian_blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), sigma)
    mu_x, mu_y, xx, yy, xy = moments.chunk(5, dim=1)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return value.mean(dim=1, keepdim=True)


def residual_map(images: torch.Tensor, reconstructions: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-pixel reconstruction error (B, 1, H, W): `l1`, `l2` (channel means) or `ssim`."""
    check_choice("residual", kind, RESIDUALS)
    if kind == "ssim":
        return 1.0 - ssim(images, reconstructions)
    difference = images - reconstructions
    error = difference.abs() if kind == "l1" else difference**2
    return error.mean(dim=1, keepdim=True)


def image_scores(maps: torch.Tensor, how: str = "max", top_k: float = 0.01) -> torch.Tensor:
    """One score per (already smoothed) map: its maximum, or the mean of its `top_k` fraction of
    largest pixels (at least one)."""
    check_choice("image_score", how, IMAGE_SCORES)
    flat = maps.flatten(1)
    if how == "max":
        return flat.amax(dim=1)
    if not 0 < top_k <= 1:
        raise ParameterError(f"top_k must be a fraction of the pixels in (0, 1], got {top_k}")
    k = max(1, round(top_k * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)
