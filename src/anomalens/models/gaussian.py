"""Gaussian density of pretrained features (Rippel, Mertens & Merhof, "Modeling the Distribution
of Normal Data in Pre-Trained Deep Features for Anomaly Detection", ICPR 2020).

1. Every feature level of an ImageNet-pretrained CNN (all stages of the backbone by default, as
   the paper uses every level of EfficientNet) is global-average-pooled into one vector per image.
2. Per level, one multivariate Gaussian is fitted to the normal images' vectors; its covariance is
   shrunk towards a scaled identity with the Ledoit-Wolf estimator (sec. 3.2: the sample
   covariance is singular or ill-conditioned when there are fewer images than channels).
3. The anomaly score is the Mahalanobis distance to the Gaussian, summed over the levels.

Image-level only: `anomaly_map` is None.
"""

from __future__ import annotations

import torch

from anomalens.components.density import fit_gaussian, mahalanobis
from anomalens.core.detector import Detector
from anomalens.core.registry import register
from anomalens.data.preprocessing import ImageLike
from anomalens.features.backbones import DEFAULT_BACKBONE, create_backbone, feature_levels
from anomalens.features.patches import pooled_dataset_features, pooled_features


@register
class Gaussian(Detector):
    """Mahalanobis distance of pooled multi-level features to a Ledoit-Wolf Gaussian."""

    name = "gaussian"
    fitted_fields = ("layers_",)
    fitted_tensors = ("backbone_", "mean_", "precision_")
    """`mean_` and `precision_`: one per feature level."""
    produces_maps = False

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: tuple[str, ...] | list[str] | None = None,
        weights: str = "auto",
        *,
        image_size: int = 256,
        target_fpr: float = 0.01,
        pixel_target_fpr: float = 0.001,
        validation_fraction: float = 0.1,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        self._store_params(locals())

    def _fit(self, images: list[ImageLike]) -> None:
        layers = self.layers or [module for module, _, _ in feature_levels(self.backbone)]
        self.backbone_ = create_backbone(self.backbone, layers, self.weights)
        self.layers_ = list(self.backbone_.layers)
        vectors = pooled_dataset_features(
            self.backbone_, images, self.image_size, self.batch_size
        ).double()
        self.mean_, self.precision_ = [], []
        for level in torch.split(vectors, list(self.backbone_.channels), dim=1):
            mean, precision = fit_gaussian(level)
            self.mean_.append(mean)
            self.precision_.append(precision)

    def _score_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        vectors = pooled_features(self.backbone_(pixels))
        channels = list(self.backbone_.channels)
        return summed_mahalanobis(vectors, channels, self.mean_, self.precision_), None

    def _build_state(self) -> None:
        self.backbone_ = create_backbone(self.backbone, self.layers_, "random")


def summed_mahalanobis(
    vectors: torch.Tensor,
    channels: list[int],
    means: list[torch.Tensor],
    precisions: list[torch.Tensor],
) -> torch.Tensor:
    """Pooled vectors (B, sum C) -> the sum over levels of the Mahalanobis distances (B,)
    float64, each level's `channels` against its own Gaussian."""
    levels = torch.split(vectors, channels, dim=1)
    distances = [
        mahalanobis(level, mean, precision)
        for level, mean, precision in zip(levels, means, precisions, strict=True)
    ]
    return torch.stack(distances).sum(dim=0)
