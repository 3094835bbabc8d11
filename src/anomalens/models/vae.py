"""Variational autoencoder (Kingma & Welling, "Auto-encoding variational Bayes", ICLR 2014), read
as a density model of normal images: an image the model finds improbable is anomalous.

1. Encoder q(z|x) = N(mu(x), diag sigma²(x)) over a `latent_dim` code, prior p(z) = N(0, I), and a
   Gaussian decoder p(x|z) = N(x̂(z), s² I) (the Gaussian-decoder case of appendix C.2) whose one
   scale s is learned with the networks, so that reconstruction and KL term balance themselves.
2. Training maximises the ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)) with the reparameterisation
   trick (sec. 2.4, one sample per image); `beta` weights the KL term (1 = the ELBO).
3. Image score (`image_score`): `elbo` = the negative ELBO in nats per pixel (reconstruction term +
   KL), `reconstruction` = the reconstruction term alone, or `max` / `top_k` of the residual map as
   for the autoencoder. Scoring uses the posterior mean z = mu(x), so scores are deterministic.
4. Anomaly map: the residual (L1, L2 or SSIM) between x and x̂(mu(x)), Gaussian-smoothed.
"""

from __future__ import annotations

import math

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

VAE_SCORES = ("elbo", "reconstruction", *IMAGE_SCORES)


class VariationalAutoencoder(nn.Module):
    """Gaussian encoder and decoder around a `latent_dim` code, plus the decoder's log-scale."""

    def __init__(self, image_size: int, latent_dim: int, width: int) -> None:
        super().__init__()
        self.encoder = ConvEncoder(image_size, 2 * latent_dim, width)
        self.decoder = ConvDecoder(image_size, latent_dim, width)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.encoder(images).chunk(2, dim=1)
        return mean, log_var.clamp(-10.0, 10.0)

    def terms(
        self, images: torch.Tensor, sample: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: reconstruction NLL and KL in nats per pixel, and the reconstruction."""
        mean, log_var = self.posterior(images)
        code = mean + torch.randn_like(mean) * (0.5 * log_var).exp() if sample else mean
        reconstruction = self.decoder(code)
        scale = self.log_scale.clamp(-7.0, 2.0)
        squared = ((images - reconstruction) ** 2).flatten(1).mean(dim=1)
        nll = 0.5 * squared * torch.exp(-2 * scale) + scale + 0.5 * math.log(2 * math.pi)
        kl = 0.5 * (mean**2 + log_var.exp() - 1 - log_var).sum(dim=1)
        return nll, kl / images[0].numel(), reconstruction


@register
class VAE(TrainedDetector):
    """Variational autoencoder; score = negative ELBO, its reconstruction term or residual map."""

    name = "vae"
    fitted_tensors = ("network_",)

    def __init__(
        self,
        latent_dim: int = 128,
        width: int = 32,
        beta: float = 1.0,
        image_score: str = "elbo",
        residual: str = "ssim",
        smoothing_sigma: float = 2.0,
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
        check_choice("image_score", self.image_score, VAE_SCORES)
        check_choice("residual", self.residual, RESIDUALS)
        check_positive("latent_dim", self.latent_dim)
        check_positive("width", self.width)
        self.network_ = VariationalAutoencoder(self.image_size, self.latent_dim, self.width)

    def _fit(self, images: list[ImageLike]) -> None:
        self._start_training()
        check_positive("beta", self.beta)
        self._build_state()
        augment = make_augmentation(self.augment)
        data = load_resized(images, self.image_size)
        optimizer = torch.optim.Adam(self.network_.parameters(), lr=self.learning_rate)

        def loss(batch: torch.Tensor) -> torch.Tensor:
            nll, kl, _ = self.network_.terms(batch, sample=True)
            return (nll + self.beta * kl).mean()

        self._train("vae", optimizer_step(loss, optimizer), data, [self.network_], augment=augment)

    def _score_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nll, kl, reconstruction = self.network_.terms(pixels, sample=False)
        residuals = residual_map(pixels, reconstruction, self.residual)
        maps = anomaly_maps(residuals, self.image_size, self.smoothing_sigma)
        if self.image_score == "elbo":
            return nll + kl, maps
        if self.image_score == "reconstruction":
            return nll, maps
        return image_scores(maps, self.image_score, self.top_k), maps
