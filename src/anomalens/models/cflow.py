"""CFlow-AD (Gudovskiy et al., "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with
Localization via Conditional Normalizing Flows", WACV 2022).

1. Feature maps of a frozen pretrained CNN at several strides (the backbone's stride-8 and
   stride-16 stages), standardised per channel with training statistics.
2. One conditional normalizing flow per level (sec. 4): `flow_steps` affine coupling blocks whose
   subnets are fully connected (Linear - ReLU - Linear, hidden width twice the input) and act on
   every position independently, conditioned on a 2D sine/cosine positional encoding of that
   position (`condition_dims` channels), so one flow models the feature distribution of every
   place in the image. Trained by maximum likelihood of a standard normal base.
3. The negative log-likelihood of every position is the anomaly map (upsampled, combined over the
   levels, Gaussian-smoothed); the image score is its maximum.

Differences from the paper's code, for a CPU: the backbone runs once per training image and the
flows train on the cached features; a minibatch is all positions of `batch_size` images rather
than random 256-position fibers (the same data per epoch in fewer, larger steps); the
positional encoding has 64 channels instead of 128 (enough for the 32x32 grid of a 256-px image
at stride 8, and it halves the subnets' input). Coupling blocks, log-determinants and the
NLL-to-map step live in `anomalens.components.flows` (shared with FastFlow; see there why not
FrEIA).
"""

from __future__ import annotations

import torch
from torch import nn

from anomalens.components.flows import build_flow, positional_encoding, zero_last_layer
from anomalens.core.registry import register
from anomalens.errors import AnomalensError
from anomalens.features.backbones import DEFAULT_BACKBONE
from anomalens.models.flow_detector import FlowDetector


@register
class CFlow(FlowDetector):
    """CFlow-AD: per-position likelihood under flows conditioned on the position."""

    name = "cflow"

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: tuple[str, ...] | list[str] | None = None,
        weights: str = "auto",
        flow_steps: int = 8,
        condition_dims: int = 64,
        clamp: float = 1.9,
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
        if self.condition_dims < 4 or self.condition_dims % 4:
            raise AnomalensError(
                f"condition_dims must be a positive multiple of 4, got {self.condition_dims}"
            )

        def subnet(step: int, inputs: int, outputs: int) -> nn.Module:
            width = inputs + self.condition_dims
            return zero_last_layer(
                nn.Sequential(
                    nn.Conv2d(width, 2 * width, 1), nn.ReLU(), nn.Conv2d(2 * width, outputs, 1)
                )
            )

        return build_flow(channels, self.flow_steps, subnet, self.clamp, generator)

    def _level_flow(self, level: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count, _, height, width = features.shape
        condition = positional_encoding(self.condition_dims, height, width).to(features)
        return self.flows_[level](features, condition.expand(count, -1, -1, -1))
