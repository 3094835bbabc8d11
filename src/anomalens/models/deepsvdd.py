"""Deep SVDD (Ruff et al., "Deep One-Class Classification", ICML 2018).

A network phi is trained on normal images to map them close to a fixed centre c, minimising the
mean squared distance ||phi(x) - c||^2 (the "one-class" objective, eq. 4) plus weight decay; the
anomaly score is ||phi(x) - c||^2. Following sec. 3.3 the network has no bias terms and no
bounded activations, and c is the mean of phi over the training images before training (fixed,
with coordinates near zero pushed to +-0.1), so phi cannot collapse onto c trivially.

Two networks:
- `pretrained=False` (the paper): a small CNN (`ConvEmbedder` with its final map flattened, as
  the paper's LeNet-style networks do, bias-free, batch norm without affine parameters) trained
  from random initialisation. The paper first pretrains it as an autoencoder; that step is left
  out here (it roughly doubles the training cost on a CPU).
- `pretrained=True`: start from the ImageNet backbone: its pooled features of the two deepest
  stages (frozen and computed once, so training is cheap on a CPU) followed by a trained
  bias-free two-layer head.
"""

from __future__ import annotations

import torch
from torch import nn

from anomalens.components.networks import ConvEmbedder
from anomalens.core.registry import register
from anomalens.core.trained_detector import TrainedDetector
from anomalens.core.training import optimizer_step
from anomalens.data.preprocessing import ImageLike, load_resized
from anomalens.features.backbones import (
    DEFAULT_BACKBONE,
    IMAGE_LEVEL_STRIDES,
    Backbone,
    layers_with_strides,
)
from anomalens.features.patches import pooled_dataset_features, pooled_features


def projection_head(in_features: int, out_features: int) -> nn.Sequential:
    """Bias-free two-layer head for the pretrained variant."""
    hidden = max(out_features, min(512, in_features))
    return nn.Sequential(
        nn.Linear(in_features, hidden, bias=False),
        nn.LeakyReLU(0.1),
        nn.Linear(hidden, out_features, bias=False),
    )


@register
class DeepSVDD(TrainedDetector):
    """Score = squared distance of a learned representation to the centre of the normal data."""

    name = "deepsvdd"
    produces_maps = False
    fitted_tensors = ("network_", "center_", "backbone_")
    """`backbone_`: None without `pretrained`."""

    def __init__(
        self,
        pretrained: bool = False,
        backbone: str = DEFAULT_BACKBONE,
        weights: str = "auto",
        rep_dim: int = 64,
        width: int = 16,
        max_epochs: int = 30,
        time_budget_s: float | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-6,
        patience: int = 5,
        *,
        image_size: int = 64,
        target_fpr: float = 0.01,
        pixel_target_fpr: float = 0.001,
        validation_fraction: float = 0.1,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        self._store_params(locals())

    def _build(self, weights: str) -> None:
        if self.pretrained:
            layers = layers_with_strides(self.backbone, IMAGE_LEVEL_STRIDES)
            self.backbone_ = Backbone(self.backbone, layers, weights)
            self.network_ = projection_head(sum(self.backbone_.channels), self.rep_dim).eval()
        else:
            self.backbone_ = None
            self.network_ = ConvEmbedder(
                self.rep_dim, self.width, bias=False, input_size=self.image_size
            ).eval()

    def _build_state(self) -> None:
        self._build("random")

    def _inputs(self, images: list[ImageLike]) -> torch.Tensor:
        """What the trained network reads: pooled backbone features, or uint8 pixels."""
        if self.pretrained:
            return pooled_dataset_features(self.backbone_, images, self.image_size, self.batch_size)
        return load_resized(images, self.image_size)

    # ---- fit ---------------------------------------------------------------------------------
    def _fit(self, images: list[ImageLike]) -> None:
        self._start_training()
        self._build(self.weights)
        data = self._inputs(images)
        self.center_ = self._initial_center(data)
        optimizer = torch.optim.Adam(
            self.network_.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )

        def loss(batch: torch.Tensor) -> torch.Tensor:
            return (self.network_(batch) - self.center_).square().sum(dim=1).mean()

        self._train("deepsvdd", optimizer_step(loss, optimizer), data, [self.network_])

    @torch.inference_mode()
    def _initial_center(self, data: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
        """Mean of phi over the training data (network in train mode, as during training)."""
        self.network_.train()
        total = torch.zeros(self.rep_dim)
        for start in range(0, len(data), self.batch_size):
            batch = data[start : start + self.batch_size]
            if batch.dtype == torch.uint8:
                batch = batch.float() / 255.0
            total += self.network_(batch).sum(dim=0)
        self.network_.eval()
        center = total / len(data)
        small = center.abs() < eps
        center[small] = torch.where(center[small] < 0, -eps, eps)
        return center.clone()

    # ---- score -------------------------------------------------------------------------------
    def _score_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        inputs = pooled_features(self.backbone_(pixels)) if self.pretrained else pixels
        return (self.network_(inputs) - self.center_).square().sum(dim=1), None
