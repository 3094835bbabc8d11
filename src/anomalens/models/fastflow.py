"""FastFlow (Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D
Normalizing Flows", arXiv:2111.07677, 2021).

1. Feature maps of a frozen pretrained CNN at several strides (sec. 3.2; here the backbone's
   stride-8 and stride-16 stages), standardised per channel with training statistics.
2. One 2D normalizing flow per level (sec. 3.3): `flow_steps` affine coupling blocks whose subnets
   are two convolutions, alternately 3x3 (local context) and 1x1, with hidden width
   `hidden_ratio` x channels, trained by maximum likelihood of a standard normal base.
3. The negative log-likelihood of every position is the anomaly map (upsampled, averaged over the
   levels, Gaussian-smoothed); the image score is its maximum.

The coupling blocks, log-determinants and NLL-to-map step live in `anomalens.components.flows`
(shared with CFlow; written there rather than taken from FrEIA, see that module). The paper trains
500 epochs on a GPU; on a CPU the backbone runs once per training image and the flows train on the
cached features, stopped by `max_epochs`, `time_budget_s` or a plateau of the training loss.
"""

from __future__ import annotations

import torch
from torch import nn

from anomalens.components.flows import build_flow, zero_last_layer
from anomalens.core.registry import register
from anomalens.features.backbones import DEFAULT_BACKBONE
from anomalens.models.flow_detector import FlowDetector


@register
class FastFlow(FlowDetector):
    """FastFlow: per-position likelihood of backbone features under 2D normalizing flows."""

    name = "fastflow"

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: tuple[str, ...] | list[str] | None = None,
        weights: str = "auto",
        flow_steps: int = 8,
        hidden_ratio: float = 1.0,
        clamp: float = 2.0,
        learning_rate: float = 1e-3,
        max_epochs: int = 20,
        time_budget_s: float | None = 300.0,
        patience: int = 10,
        smoothing_sigma: float = 4.0,
        *,
        intensity: str = "raw",
        image_size: int = 256,
        target_fpr: float = 0.01,
        pixel_target_fpr: float = 0.001,
        validation_fraction: float = 0.1,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        self._store_params(locals())

    def _build_flow(self, level: int, channels: int, generator: torch.Generator) -> nn.Module:
        hidden = max(1, round(channels * self.hidden_ratio))

        def subnet(step: int, inputs: int, outputs: int) -> nn.Module:
            kernel = 3 if step % 2 == 0 else 1
            return zero_last_layer(
                nn.Sequential(
                    nn.Conv2d(inputs, hidden, kernel, padding=kernel // 2),
                    nn.ReLU(),
                    nn.Conv2d(hidden, outputs, kernel, padding=kernel // 2),
                )
            )

        return build_flow(channels, self.flow_steps, subnet, self.clamp, generator)

    def _level_flow(self, level: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flows_[level](features)
