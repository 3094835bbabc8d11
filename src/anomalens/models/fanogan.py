"""f-AnoGAN (Schlegl, Seeböck, Waldstein, Langs, Schmidt-Erfurth, "f-AnoGAN: Fast unsupervised
anomaly detection with generative adversarial networks", Medical Image Analysis 2019).

1. GAN training: a Wasserstein GAN with gradient penalty (Gulrajani et al. 2017:
   `n_critic` critic updates per generator update, penalty weight `gp_weight`, Adam with
   betas (0, 0.9)) learns to generate normal images G(z) from codes z uniform in [-1, 1]^d.
2. Encoder training (the izi_f architecture): with G and the critic D frozen, an encoder
   E (ending in tanh, so its codes stay in G's latent range) learns x -> z by minimising
   L = 1/n ||x - G(E(x))||² + kappa/n_d ||f(x) - f(G(E(x)))||², where f are the critic's features
   before its last layer. This replaces AnoGAN's slow iterative latent search: scoring is one
   encoder and one generator pass.
3. Anomaly score: the same A(x) = image residual + kappa x critic-feature residual.
   Anomaly map: the residual |x - G(E(x))| (or L2 / SSIM), Gaussian-smoothed.

The GAN phase gets `gan_budget_fraction` of `time_budget_s`, the encoder the rest. Only the encoder
stops early on a plateau (`patience`): the critic's Wasserstein estimate first grows while the
critic learns, so it is no loss whose plateau means the generator is done.
"""

from __future__ import annotations

import torch

from anomalens.components.maps import anomaly_maps
from anomalens.components.networks import ConvDecoder, ConvEncoder, make_augmentation
from anomalens.components.residuals import RESIDUALS, residual_map
from anomalens.core.registry import register
from anomalens.core.trained_detector import TrainedDetector
from anomalens.core.training import Step, optimizer_step
from anomalens.data.preprocessing import ImageLike, load_resized
from anomalens.errors import ParameterError, check_choice, check_positive


@register
class FAnoGAN(TrainedDetector):
    """f-AnoGAN: WGAN-GP on normal images + izi_f encoder; image and critic-feature residuals."""

    name = "fanogan"
    fitted_tensors = ("generator_", "critic_", "encoder_")

    def __init__(
        self,
        latent_dim: int = 128,
        width: int = 32,
        kappa: float = 1.0,
        n_critic: int = 5,
        gp_weight: float = 10.0,
        residual: str = "l1",
        smoothing_sigma: float = 1.0,
        augment: str = "shift,brightness",
        max_epochs: int = 200,
        encoder_epochs: int = 100,
        time_budget_s: float | None = 420.0,
        gan_budget_fraction: float = 0.75,
        patience: int = 20,
        learning_rate: float = 1e-4,
        *,
        image_size: int = 64,
        target_fpr: float = 0.01,
        pixel_target_fpr: float = 0.001,
        validation_fraction: float = 0.1,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        self._store_params(locals())

    def _build_state(self) -> None:
        check_choice("residual", self.residual, RESIDUALS)
        check_positive("latent_dim", self.latent_dim)
        check_positive("width", self.width)
        self.generator_ = ConvDecoder(self.image_size, self.latent_dim, self.width)
        self.critic_ = ConvEncoder(self.image_size, 1, self.width, norm=False)
        self.encoder_ = ConvEncoder(self.image_size, self.latent_dim, self.width)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.encoder_(images))

    # ---- fit ---------------------------------------------------------------------------------
    def _fit(self, images: list[ImageLike]) -> None:
        self._start_training()
        if int(self.n_critic) < 1 or int(self.encoder_epochs) < 1:
            raise ParameterError("n_critic and encoder_epochs must be at least 1")
        if not 0 < self.gan_budget_fraction < 1:
            raise ParameterError(
                f"gan_budget_fraction must be in (0, 1), got {self.gan_budget_fraction}"
            )
        self._build_state()
        augment = make_augmentation(self.augment)
        data = load_resized(images, self.image_size)
        budget = self.time_budget_s
        gan = self._train(
            "wgan-gp",
            self._gan_step(),
            data,
            [self.generator_, self.critic_],
            time_budget_s=None if budget is None else budget * self.gan_budget_fraction,
            augment=augment,
            patience=int(self.max_epochs),
        )
        for module in (self.generator_, self.critic_):
            module.requires_grad_(False)
        optimizer = torch.optim.Adam(
            self.encoder_.parameters(), lr=self.learning_rate, betas=(0.5, 0.999)
        )

        def loss(batch: torch.Tensor) -> torch.Tensor:
            return self._izif(batch, self.generator_(self._encode(batch))).mean()

        self._train(
            "izif encoder",
            optimizer_step(loss, optimizer),
            data,
            [self.encoder_],
            max_epochs=int(self.encoder_epochs),
            time_budget_s=None if budget is None else max(1.0, budget - gan.seconds),
            augment=augment,
        )

    def _gan_step(self) -> Step:
        """One critic update per batch, one generator update after every `n_critic` of them;
        returns the critic's Wasserstein distance estimate (what the generator drives down)."""
        betas = (0.0, 0.9)
        critic_optimizer = torch.optim.Adam(
            self.critic_.parameters(), lr=self.learning_rate, betas=betas
        )
        generator_optimizer = torch.optim.Adam(
            self.generator_.parameters(), lr=self.learning_rate, betas=betas
        )
        calls = 0

        def sample(count: int) -> torch.Tensor:
            return torch.rand(count, self.latent_dim) * 2 - 1

        def step(real: torch.Tensor) -> float:
            nonlocal calls
            calls += 1
            count = len(real)
            with torch.no_grad():
                fake = self.generator_(sample(count))
            mix = torch.rand(count, 1, 1, 1)
            between = (mix * real + (1 - mix) * fake).requires_grad_(True)
            (gradient,) = torch.autograd.grad(
                self.critic_(between).sum(), between, create_graph=True
            )
            penalty = ((gradient.flatten(1).norm(dim=1) - 1) ** 2).mean()
            distance = self.critic_(real).mean() - self.critic_(fake).mean()
            critic_optimizer.zero_grad(set_to_none=True)
            (self.gp_weight * penalty - distance).backward()
            critic_optimizer.step()
            if calls % int(self.n_critic) == 0:
                generator_optimizer.zero_grad(set_to_none=True)
                (-self.critic_(self.generator_(sample(count))).mean()).backward()
                generator_optimizer.step()
            return float(distance.detach())

        return step

    def _izif(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Per image: 1/n ||x - G(E(x))||² + kappa/n_d ||f(x) - f(G(E(x)))||² ."""
        image_residual = ((images - reconstruction) ** 2).flatten(1).mean(dim=1)
        feature_residual = (
            (self.critic_.features(images) - self.critic_.features(reconstruction)) ** 2
        ).mean(dim=1)
        return image_residual + self.kappa * feature_residual

    # ---- score -------------------------------------------------------------------------------
    def _score_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction = self.generator_(self._encode(pixels))
        residuals = residual_map(pixels, reconstruction, self.residual)
        maps = anomaly_maps(residuals, self.image_size, self.smoothing_sigma)
        return self._izif(pixels, reconstruction), maps
