"""Small convolutional networks for the methods that train from scratch (RotNet, Deep SVDD)."""

from __future__ import annotations

from torch import nn


class ConvEncoder(nn.Sequential):
    """A plain CNN: a 3x3 convolution with `width` channels at full resolution, then `stages`
    stride-2 3x3 convolutions doubling the channels (each with batch norm and leaky ReLU), global
    average pooling (or, given `input_size`, flattening of the final map, which keeps where
    things are) and a linear layer to `out_features`. Stride-2 convolutions rather than max
    pooling: on a CPU, pooling took half the time of the whole network.

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
