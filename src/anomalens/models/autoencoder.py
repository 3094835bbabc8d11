"""Convolutional autoencoder (Bergmann, Löwe, Fauser, Sattlegger, Steger, "Improving unsupervised
defect segmentation by applying structural similarity to autoencoders", VISAPP 2019).

1. An encoder of strided 4x4 convolutions squeezes the image into a narrow `latent_dim` vector and
   a mirrored decoder reconstructs the image from it. Trained on normal images only, the network
   learns to reproduce what is normal; a defect is not representable and is reconstructed wrongly.
2. The training loss is the mean of the residual the detector scores with (L2 for AE-L2,
   1 - SSIM for AE-SSIM; L1 is also offered).
3. The anomaly map is the per-pixel residual between input and reconstruction, Gaussian-smoothed;
   the image score is its maximum, or the mean of its `top_k` fraction of largest pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from anomalens.components.maps import anomaly_maps
from anomalens.components.networks import ConvDecoder, ConvEncoder, make_augmentation
from anomalens.components.residuals import IMAGE_SCORES, RESIDUALS, image_scores, residual_map
from anomalens.core.registry import register
from anomalens.core.trained_detector import TrainedDetector
from anomalens.core.training import optimizer_step
from anomalens.data.preprocessing import ImageLike, load_resized
from anomalens.errors import check_choice, check_positive


@register
class Autoencoder(TrainedDetector):
    """Convolutional autoencoder with a narrow bottleneck; residual map L1, L2 or SSIM."""

    name = "autoencoder"
    fitted_tensors = ("network_",)

    def __init__(
        self,
        latent_dim: int = 128,
        width: int = 32,
        residual: str = "ssim",
        smoothing_sigma: float = 2.0,
        image_score: str = "max",
        top_k: float = 0.01,
        augment: str = "shift,brightness",
        max_epochs: int = 100,
        time_budget_s: float | None = 420.0,
        patience: int = 10,
        learning_rate: float = 1e-3,
        *,
        image_size: int = 128,
        target_fpr: float = 0.01,
        pixel_target_fpr: float = 0.001,
        validation_fraction: float = 0.1,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        self._store_params(locals())

    def _build_state(self) -> None:
        check_choice("residual", self.residual, RESIDUALS)
        check_choice("image_score", self.image_score, IMAGE_SCORES)
        check_positive("latent_dim", self.latent_dim)
        check_positive("width", self.width)
        self.network_ = nn.Sequential(
            ConvEncoder(self.image_size, self.latent_dim, self.width),
            ConvDecoder(self.image_size, self.latent_dim, self.width),
        )

    def _fit(self, images: list[ImageLike]) -> None:
        self._start_training()
        self._build_state()
        augment = make_augmentation(self.augment)
        data = load_resized(images, self.image_size)
        optimizer = torch.optim.Adam(self.network_.parameters(), lr=self.learning_rate)

        def loss(batch: torch.Tensor) -> torch.Tensor:
            return residual_map(batch, self.network_(batch), self.residual).mean()

        self._train(
            "autoencoder", optimizer_step(loss, optimizer), data, [self.network_], augment=augment
        )

    def _score_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residuals = residual_map(pixels, self.network_(pixels), self.residual)
        maps = anomaly_maps(residuals, self.image_size, self.smoothing_sigma)
        return image_scores(maps, self.image_score, self.top_k), maps
