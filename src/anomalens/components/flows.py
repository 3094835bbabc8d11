"""Normalizing flows on frozen pretrained features: the parts FastFlow and CFlow share.

A flow maps a feature map x (B, C, h, w) to z of the same shape through invertible affine coupling
blocks (Dinh et al., "Density estimation using Real NVP", ICLR 2017; Kingma & Dhariwal, "Glow",
NeurIPS 2018), so that log p(x) = log N(z; 0, I) + log |det dz/dx| exactly. Because each block's
scales act position by position, the log-determinant splits over positions, and the negative
log-likelihood of every position is the anomaly map.

The coupling block is written here rather than taken from FrEIA: FrEIA does install from PyPI,
but its last release (0.2) is from July 2022, and the one block the detectors need (FrEIA's
`AllInOneBlock` reduced to affine coupling, a learned per-channel scale and a fixed permutation)
is ~50 lines that read like the equations. Scales are soft-clamped as in FrEIA and FastFlow,
s = (2 clamp / pi) atan(a / clamp), so |s| < clamp and no log-determinant can overflow; the last
layer of each subnet starts at zero, so every block starts as the identity.

The detectors themselves share `anomalens.models.flow_detector.FlowDetector`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from anomalens.components.maps import gaussian_blur, resize_maps
from anomalens.errors import ParameterError

LOG_2PI = math.log(2 * math.pi)


def soft_clamp(values: torch.Tensor, clamp: float) -> torch.Tensor:
    """Smoothly squash `values` into (-clamp, clamp), ~identity near 0 (FrEIA's ATAN clamp)."""
    return (2 * clamp / math.pi) * torch.atan(values / clamp)


class AffineCoupling(nn.Module):
    """One flow step on (B, C, h, w): y2 = x2 * exp(s) + t with (s, t) = subnet(x1 [, condition]),
    then a learned per-channel affine map and a fixed channel permutation."""

    def __init__(
        self, channels: int, subnet: nn.Module, clamp: float, permutation: torch.Tensor
    ) -> None:
        super().__init__()
        self.split = channels // 2
        self.subnet = subnet
        self.clamp = clamp
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("permutation", permutation)

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns y and the log-determinant of each position, (B, h, w)."""
        x1, x2 = x[:, : self.split], x[:, self.split :]
        inputs = x1 if condition is None else torch.cat([x1, condition], dim=1)
        scale, shift = self.subnet(inputs).chunk(2, dim=1)
        scale = soft_clamp(scale, self.clamp)
        y = torch.cat([x1, x2 * torch.exp(scale) + shift], dim=1)
        global_scale = soft_clamp(self.log_scale, self.clamp)
        y = y * torch.exp(global_scale) + self.shift
        log_det = scale.sum(dim=1) + global_scale.sum()
        return y[:, self.permutation], log_det


def zero_last_layer(subnet: nn.Sequential) -> nn.Sequential:
    """Zero the subnet's last layer so its coupling block starts as the identity."""
    nn.init.zeros_(subnet[-1].weight)
    nn.init.zeros_(subnet[-1].bias)
    return subnet


class Flow(nn.Module):
    """A stack of coupling blocks; `forward` gives z and the per-position log-determinant."""

    def __init__(self, blocks: list[AffineCoupling]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = torch.zeros(x.shape[0], *x.shape[2:], dtype=x.dtype)
        for block in self.blocks:
            x, block_log_det = block(x, condition)
            log_det = log_det + block_log_det
        return x, log_det


def build_flow(
    channels: int,
    steps: int,
    subnet: Callable[[int, int, int], nn.Module],
    clamp: float,
    generator: torch.Generator,
) -> Flow:
    """`steps` coupling blocks with seeded random permutations; `subnet(step, in, out)` builds
    the subnet of block `step` mapping `in` channels to `out` (= 2 x the transformed half)."""
    split = channels // 2
    blocks = [
        AffineCoupling(
            channels,
            subnet(step, split, 2 * (channels - split)),
            clamp,
            torch.randperm(channels, generator=generator),
        )
        for step in range(steps)
    ]
    return Flow(blocks)


def positional_encoding(channels: int, height: int, width: int) -> torch.Tensor:
    """2D sine/cosine encoding of every position, (channels, height, width): the first half of
    the channels encodes the column, the second half the row (Vaswani et al. 2017; CFlow's 2D)."""
    if channels % 4:
        raise ParameterError(f"positional encoding needs a multiple of 4 channels, got {channels}")
    quarter = channels // 4
    frequencies = torch.exp(torch.arange(quarter) * (-math.log(10000.0) / quarter))
    columns = torch.arange(width, dtype=torch.float32)[:, None] * frequencies
    rows = torch.arange(height, dtype=torch.float32)[:, None] * frequencies
    encoding = torch.empty(channels, height, width)
    half = channels // 2
    encoding[0:half:2] = torch.sin(columns).T[:, None, :].expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(columns).T[:, None, :].expand(-1, height, -1)
    encoding[half::2] = torch.sin(rows).T[:, :, None].expand(-1, -1, width)
    encoding[half + 1 :: 2] = torch.cos(rows).T[:, :, None].expand(-1, -1, width)
    return encoding


def gaussian_nll(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per dimension of every position, (B, h, w): the flow's density
    under a standard normal base, -(log N(z; 0, I) + log|det|) / C."""
    channels = z.shape[1]
    return (0.5 * z.pow(2).sum(dim=1) - log_det) / channels + 0.5 * LOG_2PI


def nll_to_map(level_nll: list[torch.Tensor], size: int, sigma: float) -> torch.Tensor:
    """Per-level NLL maps (B, h, w) -> one (B, size, size) anomaly map.

    As FastFlow and CFlow do, the levels are combined in likelihood space: each level's likelihood
    exp(-NLL) is upsampled (bilinear), the levels are averaged and the result Gaussian-smoothed;
    the map is the NLL of that, -log(smoothed mean likelihood). A position is as anomalous as all
    levels agree it is unlikely; a plain mean of NLLs lets one level's unbounded values drown the
    others (on bottle it costs ~2 points of pixel AUROC). Computed in float64 relative to each
    image's smallest NLL, so nothing underflows short of ~700 nats per dimension above it."""
    offset = torch.stack([level.amin(dim=(1, 2)) for level in level_nll]).amin(dim=0)
    offset = offset.double()[:, None, None, None]
    likelihood = torch.stack(
        [
            resize_maps(torch.exp(offset - level.double()[:, None]), (size, size))
            for level in level_nll
        ]
    ).mean(dim=0)
    likelihood = gaussian_blur(likelihood, sigma).clamp_min(torch.finfo(torch.float64).tiny)
    return (offset - torch.log(likelihood))[:, 0].float()
