"""Handcrafted patch features that need no neural network: a drop-in for a CNN `Backbone`.

Every level is a grid of overlapping windows (side 2 x stride, one per stride pixels) and, per
window, describes

- colour: mean and standard deviation of R, G and B (6 values);
- micro-texture: the histogram of rotation-invariant uniform local binary patterns (Ojala et al.,
  TPAMI 2002; 8 neighbours at radius 1, 10 codes, scikit-image);
- edges: the histogram of unsigned gradient orientations weighted by gradient magnitude (8 bins,
  as one HOG cell, Dalal & Triggs, CVPR 2005; Sobel gradients from scikit-image) and the mean
  gradient magnitude (1 value).

Histograms are square-rooted (Hellinger mapping) so that Euclidean distances between them are
meaningful for nearest-neighbour methods. 25 channels per level. Layers are named by their
stride, e.g. ``cells8`` (windows of 16 pixels every 8 pixels).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from skimage.feature import local_binary_pattern
from skimage.filters import sobel_h, sobel_v
from torch import nn

from anomalens.data.preprocessing import INTENSITY_MODES, normalize_intensity
from anomalens.errors import WeightsError, check_choice

HANDCRAFTED = "handcrafted"
STRIDES = (4, 8, 16, 32)
LBP_POINTS = 8
LBP_CODES = LBP_POINTS + 2
ORIENTATIONS = 8
CHANNELS = 6 + LBP_CODES + ORIENTATIONS + 1
_LUMA = (0.299, 0.587, 0.114)


def handcrafted_levels() -> list[tuple[str, int, int]]:
    """(layer name, stride, channels) of every handcrafted level, like `feature_levels`."""
    return [(f"cells{stride}", stride, CHANNELS) for stride in STRIDES]


class HandcraftedFeatures(nn.Module):
    """Colour, LBP and gradient-orientation statistics of overlapping windows at each layer.

    Same interface as `Backbone`: `layers`, `strides`, `channels`, and `forward(images)` taking a
    (B, 3, H, W) float tensor in [0, 1] and returning one (B, C, H / stride, W / stride) map per
    layer. It has no weights.
    """

    def __init__(
        self,
        layers: tuple[str, ...] | None = None,
        intensity: str = "raw",
        letterboxed: bool = False,
    ) -> None:
        super().__init__()
        check_choice("intensity", intensity, INTENSITY_MODES)
        self.intensity = intensity
        self.letterboxed = letterboxed
        levels = {name: (stride, channels) for name, stride, channels in handcrafted_levels()}
        self.name = HANDCRAFTED
        self.layers = tuple(layers) if layers else ("cells8", "cells16")
        unknown = [layer for layer in self.layers if layer not in levels]
        if unknown:
            raise WeightsError(
                f"backbone {HANDCRAFTED!r} has no feature layer {unknown[0]!r}; "
                f"choose from {list(levels)}"
            )
        self.strides = tuple(levels[layer][0] for layer in self.layers)
        self.channels = tuple(levels[layer][1] for layer in self.layers)
        self.eval()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        pixels = _pixel_features(
            normalize_intensity(images.float(), self.intensity, self.letterboxed)
        )
        return [_window_statistics(pixels, stride) for stride in self.strides]


def _pixel_features(images: torch.Tensor) -> torch.Tensor:
    """Per pixel: RGB, RGB squared, one-hot LBP code, magnitude-weighted orientation bins,
    gradient magnitude and a constant 1 (to normalise the orientation histogram)."""
    luma = torch.tensor(_LUMA, dtype=images.dtype).view(1, 3, 1, 1)
    gray = (images * luma).sum(dim=1).numpy()
    codes, orientation, magnitude = [], [], []
    for image in gray:
        levels = np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
        codes.append(local_binary_pattern(levels, LBP_POINTS, 1, method="uniform"))
        dy, dx = sobel_h(image), sobel_v(image)
        orientation.append(np.mod(np.arctan2(dy, dx), math.pi))
        magnitude.append(np.hypot(dx, dy))
    code = torch.from_numpy(np.stack(codes)).long()
    lbp = F.one_hot(code, LBP_CODES).permute(0, 3, 1, 2).to(images.dtype)
    magnitudes = torch.from_numpy(np.stack(magnitude)).to(images.dtype)
    # Linear (soft) assignment of each orientation to its two nearest of ORIENTATIONS bins.
    position = torch.from_numpy(np.stack(orientation)).to(images.dtype) * ORIENTATIONS / math.pi
    lower = position.floor()
    upper_weight = position - lower
    bins = torch.zeros(images.shape[0], ORIENTATIONS, *images.shape[-2:], dtype=images.dtype)
    lower_index = lower.long().remainder(ORIENTATIONS)[:, None]
    bins.scatter_add_(1, lower_index, ((1 - upper_weight) * magnitudes)[:, None])
    bins.scatter_add_(1, (lower_index + 1) % ORIENTATIONS, (upper_weight * magnitudes)[:, None])
    return torch.cat([images, images * images, lbp, bins, magnitudes[:, None]], dim=1)


def _window_statistics(pixels: torch.Tensor, stride: int) -> torch.Tensor:
    """Average the per-pixel features over windows of side 2 * stride every stride pixels
    (ceil(H / stride) x ceil(W / stride) of them, like a CNN stage with "same" padding) and turn
    the averages into the 25 descriptor channels."""
    means = F.avg_pool2d(
        pixels,
        2 * stride,
        stride=stride,
        padding=stride // 2,
        ceil_mode=True,
        count_include_pad=False,
    )
    colour = means[:, 0:3]
    spread = (means[:, 3:6] - colour * colour).clamp_min(0.0).sqrt()
    lbp = means[:, 6 : 6 + LBP_CODES].clamp_min(0.0).sqrt()
    magnitude = means[:, -1:]
    orientation = means[:, 6 + LBP_CODES : -1] / (magnitude + 1e-6)
    return torch.cat([colour, spread, lbp, orientation.clamp_min(0.0).sqrt(), magnitude], dim=1)
