"""Building blocks of the trained networks: convolutional encoders/decoder and augmentation that
keeps normal images normal."""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from anomalens.errors import ParameterError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

AUGMENTATIONS: dict[str, str] = {
    "shift": "random translation by up to 3% of the side (reflected border)",
    "brightness": "random brightness and contrast change by up to 10%",
    "hflip": "horizontal flip with probability 1/2 (only where left/right does not matter)",
    "vflip": "vertical flip with probability 1/2 (only where up/down does not matter)",
    "rot90": "rotation by a random multiple of 90 degrees (textures, top-down views)",
}


def spatial_levels(image_size: int, smallest: int = 4) -> int:
    """How many stride-2 stages take `image_size` down to a side in [smallest, 2 * smallest)."""
    if image_size < 2 * smallest:
        raise ParameterError(f"image_size must be at least {2 * smallest}, got {image_size}")
    levels = int(math.log2(image_size / smallest))
    if image_size % 2**levels:
        raise ParameterError(
            f"image_size {image_size} must be divisible by {2**levels} "
            f"(the networks halve it {levels} times); e.g. {image_size // 2**levels * 2**levels}"
        )
    return levels


def _widths(levels: int, width: int, max_width: int) -> list[int]:
    return [min(width * 2**i, max_width) for i in range(levels)]


class ConvEncoder(nn.Module):
    """(B, C, S, S) -> (B, out_dim): 4x4 stride-2 convolutions (DCGAN / Bergmann et al. 2019) that
    double the width at each halving, then one convolution over the whole remaining map.

    `features(x)` returns the flattened activations before that last layer (the discriminator
    features of f-AnoGAN). `norm=False` drops batch normalisation (a WGAN-GP critic needs that).
    """

    def __init__(
        self,
        image_size: int,
        out_dim: int,
        width: int = 32,
        max_width: int = 256,
        norm: bool = True,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        levels = spatial_levels(image_size)
        layers: list[nn.Module] = []
        channels = in_channels
        for i, out in enumerate(_widths(levels, width, max_width)):
            use_norm = norm and i > 0
            layers.append(nn.Conv2d(channels, out, 4, stride=2, padding=1, bias=not use_norm))
            if use_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.LeakyReLU(0.2))
            channels = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, out_dim, image_size // 2**levels)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images)).flatten(1)


class ConvEmbedder(nn.Sequential):
    """(B, C, S, S) -> (B, out_features), for the methods trained from scratch on whole images
    (RotNet, Deep SVDD). A plain CNN: a 3x3 convolution with `width` channels at full resolution,
    then `stages` stride-2 3x3 convolutions doubling the channels (each with batch norm and leaky
    ReLU), global average pooling (or, given `input_size`, flattening of the final map, which
    keeps where things are) and a linear layer to `out_features`. Stride-2 convolutions rather
    than max pooling: on a CPU, pooling took half the time of the whole network.

    `bias=False` removes every bias and batch-norm offset, as Deep SVDD needs (Ruff et al. 2018,
    sec. 3.3: a network with bias terms can map everything onto the centre and learn nothing).
    """

    def __init__(
        self,
        out_features: int,
        width: int = 32,
        stages: int = 3,
        in_channels: int = 3,
        bias: bool = True,
        input_size: int | None = None,
    ) -> None:
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(stages + 1):
            out = width * 2**stage
            layers += [
                nn.Conv2d(channels, out, 3, stride=1 if stage == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(out, affine=bias),
                nn.LeakyReLU(0.1),
            ]
            channels = out
        if input_size is None:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        else:
            side = input_size
            for _ in range(stages):
                side = (side + 1) // 2
            layers.append(nn.Flatten())
            channels *= side * side
        layers.append(nn.Linear(channels, out_features, bias=bias))
        super().__init__(*layers)


class ConvDecoder(nn.Module):
    """(B, in_dim) -> (B, C, S, S) in [0, 1]: the mirror image of `ConvEncoder`."""

    def __init__(
        self,
        image_size: int,
        in_dim: int,
        width: int = 32,
        max_width: int = 256,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        levels = spatial_levels(image_size)
        widths = _widths(levels, width, max_width)[::-1]
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(in_dim, widths[0], image_size // 2**levels, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        ]
        for channels, out in pairwise(widths):
            layers += [
                nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(),
            ]
        layers += [nn.ConvTranspose2d(widths[-1], out_channels, 4, stride=2, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(codes[:, :, None, None]))


def make_augmentation(spec: str) -> Augment | None:
    """An augmentation from a comma-separated list of `AUGMENTATIONS` names ("" or "none": none).

    Only transformations under which a normal image stays normal belong here; flips and rotations
    are opt-in because on many objects orientation is part of being normal.
    """
    names = [name.strip() for name in spec.split(",") if name.strip() not in ("", "none")]
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise ParameterError(
            f"unknown augmentation {unknown[0]!r} in augment={spec!r}; "
            f"choose from {', '.join(AUGMENTATIONS)} (comma-separated) or none"
        )
    if not names:
        return None

    def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for name in names:
            batch = _OPS[name](batch, generator)
        return batch

    return augment


def _uniform(count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def _shift(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    height, width = batch.shape[-2:]
    margin = max(1, round(0.03 * min(height, width)))
    padded = F.pad(batch, (margin,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * margin + 1, (len(batch), 2), generator=generator).tolist()
    return torch.stack(
        [p[:, y : y + height, x : x + width] for p, (y, x) in zip(padded, offsets, strict=True)]
    )


def _brightness(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    count = len(batch)
    gain = _uniform(count, 0.9, 1.1, generator).view(-1, 1, 1, 1)
    contrast = _uniform(count, 0.9, 1.1, generator).view(-1, 1, 1, 1)
    mean = batch.mean(dim=(1, 2, 3), keepdim=True)
    return ((batch - mean) * contrast + mean * gain).clamp(0.0, 1.0)


def _flip(dim: int) -> Augment:
    def flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        chosen = torch.rand(len(batch), generator=generator) < 0.5
        return torch.where(chosen.view(-1, 1, 1, 1), batch.flip(dim), batch)

    return flip


def _rot90(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    turns = torch.randint(0, 4, (len(batch),), generator=generator).tolist()
    return torch.stack([torch.rot90(x, k, dims=(1, 2)) for x, k in zip(batch, turns, strict=True)])


_OPS: dict[str, Augment] = {
    "shift": _shift,
    "brightness": _brightness,
    "hflip": _flip(-1),
    "vflip": _flip(-2),
    "rot90": _rot90,
}
