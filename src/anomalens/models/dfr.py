"""Deep feature reconstruction (Shi, Yang, Qi, "Unsupervised anomaly segmentation via deep feature
reconstruction", Neurocomputing 2021): reconstruct pretrained CNN features instead of pixels.

1. Multi-scale regional features: the feature maps of several stages of a frozen ImageNet CNN,
   each averaged over a 3x3 neighbourhood, upsampled to the finest of them and concatenated
   (`anomalens.features.aggregate_patches`); here standardised per channel on the training images
   so that every stage counts alike.
2. A convolutional autoencoder of 1x1 convolutions with batch norm and ReLU squeezes every feature
   vector through a `latent_channels` bottleneck and reconstructs it; trained on normal images
   with the L2 loss. With `latent_channels=None` the bottleneck is as wide as the number of
   principal components that explain `latent_variance` of the training features' variance (the
   paper's PCA rule).
3. Anomaly map: the per-position squared reconstruction error (channel mean), upsampled to the
   image and Gaussian-smoothed; image score: its maximum or the mean of its top-k pixels.

The frozen backbone runs once per training image; only the small 1x1 autoencoder is trained, on the
cached features, so the method fits in a fraction of the time of a pixel autoencoder.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import torch
from torch import nn

from anomalens.components.maps import anomaly_maps
from anomalens.components.residuals import IMAGE_SCORES, image_scores
from anomalens.core.registry import register
from anomalens.core.trained_detector import TrainedDetector
from anomalens.core.training import optimizer_step
from anomalens.data.preprocessing import ImageLike, check_resize
from anomalens.errors import ParameterError, check_choice
from anomalens.features.backbones import DEFAULT_BACKBONE, Backbone
from anomalens.features.patches import aggregate_patches, flatten_patches


def feature_autoencoder(channels: int, latent: int) -> nn.Sequential:
    """DFR's 1x1 convolutional autoencoder, C -> (C+2d)/2 -> 2d -> d -> 2d -> (C+2d)/2 -> C, as
    linear layers over single feature vectors (a 1x1 convolution is one per position)."""
    hidden = (channels + 2 * latent) // 2
    widths = [channels, hidden, 2 * latent, latent, 2 * latent, hidden, channels]
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(pairwise(widths)):
        last = i == len(widths) - 2
        layers.append(nn.Linear(cin, cout, bias=last))
        if not last:
            layers += [nn.BatchNorm1d(cout), nn.ReLU()]
    return nn.Sequential(*layers)


def vector_batch_size(count: int) -> int:
    """Mini-batches of up to 1024 feature vectors, but at least 32 of them per epoch."""
    return max(16, min(1024, count // 32))


def pca_components(features: torch.Tensor, variance: float) -> int:
    """How many principal components of the rows of `features` explain `variance` of the total."""
    centered = features - features.mean(dim=0)
    eigenvalues = torch.linalg.eigvalsh(centered.T @ centered).flip(0).clamp_min(0)
    explained = torch.cumsum(eigenvalues, 0) / eigenvalues.sum()
    return int(torch.searchsorted(explained, torch.tensor(variance)).item()) + 1


@register
class DFR(TrainedDetector):
    """Deep feature reconstruction: a 1x1 autoencoder over frozen multi-scale CNN features."""

    name = "dfr"
    fitted_fields = ("training_", "layers_", "latent_channels_")
    fitted_tensors = ("backbone_", "network_", "feature_mean_", "feature_std_")

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: tuple[str, ...] | list[str] | None = None,
        weights: str = "auto",
        latent_channels: int | None = None,
        latent_variance: float = 0.9,
        smoothing_sigma: float = 4.0,
        image_score: str = "max",
        top_k: float = 0.01,
        max_epochs: int = 30,
        time_budget_s: float | None = 420.0,
        patience: int = 5,
        learning_rate: float = 1e-3,
        *,
        resize: str = "squash",
        intensity: str = "raw",
        image_size: int = 256,
        target_fpr: float = 0.01,
        pixel_target_fpr: float = 0.001,
        validation_fraction: float = 0.1,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        self._store_params(locals())

    # ---- features ----------------------------------------------------------------------------
    def _build_backbone(self, weights: str | Path, layers: list[str] | None) -> None:
        layers = tuple(layers) if layers else None
        letterboxed = self.resize == "letterbox"
        self.backbone_ = Backbone(self.backbone, layers, weights, self.intensity, letterboxed)
        self.layers_ = list(self.backbone_.layers)

    @torch.inference_mode()
    def _vectors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, S, S) in [0, 1] -> regional feature vectors (B * h * w, C) and (h, w)."""
        features = aggregate_patches(self.backbone_(pixels), damp_border=False)
        return flatten_patches(features), tuple(features.shape[-2:])

    def _extract(self, images: list[ImageLike]) -> torch.Tensor:
        """Feature vectors of all images, float16 to halve the memory of the training set."""
        chunks = []
        for batch in self._batches(images, "features"):
            chunks.append(self._vectors(batch.pixels)[0].half())
        return torch.cat(chunks)

    def _standardise(self, vectors: torch.Tensor) -> torch.Tensor:
        return (vectors.float() - self.feature_mean_) / self.feature_std_

    # ---- fit ---------------------------------------------------------------------------------
    def _fit(self, images: list[ImageLike]) -> None:
        self._start_training()
        check_choice("image_score", self.image_score, IMAGE_SCORES)
        check_resize(self.resize)
        if not 0 < self.latent_variance <= 1:
            raise ParameterError(f"latent_variance must be in (0, 1], got {self.latent_variance}")
        if self.latent_channels is not None and int(self.latent_channels) < 1:
            raise ParameterError(f"latent_channels must be positive, got {self.latent_channels}")
        self._build_backbone(self.weights, self.layers)
        vectors = self._extract(images)
        total = torch.zeros(vectors.shape[1], dtype=torch.float64)
        squares = torch.zeros_like(total)
        for chunk in vectors.split(65536):
            total += chunk.double().sum(dim=0)
            squares += (chunk.double() ** 2).sum(dim=0)
        mean = total / len(vectors)
        std = (squares / len(vectors) - mean**2).clamp_min(0).sqrt()
        self.feature_mean_ = mean.float()
        self.feature_std_ = std.float().clamp_min(1e-6)
        vectors = torch.cat([self._standardise(chunk).half() for chunk in vectors.split(65536)])
        if self.latent_channels is None:
            generator = torch.Generator().manual_seed(self.seed)
            sample = vectors[torch.randperm(len(vectors), generator=generator)[:20_000]]
            self.latent_channels_ = pca_components(sample.float(), self.latent_variance)
        else:
            self.latent_channels_ = int(self.latent_channels)
        self.network_ = feature_autoencoder(vectors.shape[1], self.latent_channels_)
        optimizer = torch.optim.Adam(self.network_.parameters(), lr=self.learning_rate)

        def loss(batch: torch.Tensor) -> torch.Tensor:
            batch = batch.float()
            return ((self.network_(batch) - batch) ** 2).mean()

        self._train(
            "feature autoencoder",
            optimizer_step(loss, optimizer),
            vectors,
            [self.network_],
            batch_size=vector_batch_size(len(vectors)),
        )

    # ---- score -------------------------------------------------------------------------------
    def _score_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vectors, (height, width) = self._vectors(pixels)
        vectors = self._standardise(vectors)
        errors = ((self.network_(vectors) - vectors) ** 2).mean(dim=1)
        errors = errors.view(-1, 1, height, width)
        maps = anomaly_maps(errors, pixels.shape[-2:], self.smoothing_sigma)
        return image_scores(maps, self.image_score, self.top_k), maps

    # ---- persistence -------------------------------------------------------------------------
    def _build_state(self) -> None:
        self._build_backbone("random", self.layers_)
        self.network_ = feature_autoencoder(sum(self.backbone_.channels), self.latent_channels_)
