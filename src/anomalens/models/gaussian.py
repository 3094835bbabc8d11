"""Gaussian density of pretrained features (Rippel, Mertens & Merhof, "Modeling the Distribution
of Normal Data in Pre-Trained Deep Features for Anomaly Detection", ICPR 2020).

1. Every feature level of an ImageNet-pretrained CNN (all stages of the backbone by default, as
   the paper uses every level of EfficientNet) is global-average-pooled into one vector per image.
2. Per level, one multivariate Gaussian is fitted to the normal images' vectors; its covariance is
   shrunk towards a scaled identity with the Ledoit-Wolf estimator (sec. 3.2: the sample
   covariance is singular or ill-conditioned when there are fewer images than channels).
3. The anomaly score is the Mahalanobis distance to the Gaussian, summed over the levels.

The model keeps the running sums the Gaussians are estimated from (`Moments`, with the fourth
moments the Ledoit-Wolf shrinkage needs), so `partial_fit` gives what one fit on all the images
would, up to float rounding.

Image-level only: `anomaly_map` is None.
"""

from __future__ import annotations

import torch

from anomalens.components.density import Moments, ledoit_wolf_precision, mahalanobis
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
    fitted_tensors = (
        "backbone_",
        "mean_",
        "precision_",
        "count_",
        "shift_",
        "total_",
        "scatter_",
        "weighted_",
        "quartic_",
    )
    """`mean_`, `precision_` and the running sums but `count_`: one per feature level."""
    update_tensors = ("count_", "shift_", "total_", "scatter_", "weighted_", "quartic_")
    produces_maps = False

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: tuple[str, ...] | list[str] | None = None,
        weights: str = "auto",
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

    def _fit(self, images: list[ImageLike]) -> None:
        layers = self.layers or [module for module, _, _ in feature_levels(self.backbone)]
        self.backbone_ = create_backbone(self.backbone, layers, self.weights, self.intensity)
        self.layers_ = list(self.backbone_.layers)
        self.count_ = None
        self._update(images)

    def _update(self, images: list[ImageLike]) -> None:
        """Add the images' pooled vectors to each level's sums (float64, about the first
        images' mean), then re-estimate each level's Gaussian."""
        vectors = pooled_dataset_features(
            self.backbone_, images, self.image_size, self.batch_size
        ).double()
        levels = torch.split(vectors, list(self.backbone_.channels), dim=1)
        if self.count_ is None:
            moments = [Moments.start(level, fourth=True) for level in levels]
        else:
            moments = [
                Moments(self.count_.clone(), *parts)
                for parts in zip(
                    self.shift_,
                    self.total_,
                    self.scatter_,
                    self.weighted_,
                    self.quartic_,
                    strict=True,
                )
            ]
        for level, sums in zip(levels, moments, strict=True):
            sums.add(level)
        self.count_ = moments[0].count
        for name in ("shift", "total", "scatter", "weighted", "quartic"):
            setattr(self, f"{name}_", [getattr(sums, name) for sums in moments])
        self.mean_ = [sums.mean() for sums in moments]
        self.precision_ = [ledoit_wolf_precision(sums) for sums in moments]

    def _score_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        vectors = pooled_features(self.backbone_(pixels))
        channels = list(self.backbone_.channels)
        return summed_mahalanobis(vectors, channels, self.mean_, self.precision_), None

    def _build_state(self) -> None:
        self.backbone_ = create_backbone(self.backbone, self.layers_, "random", self.intensity)


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
