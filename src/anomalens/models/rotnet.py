"""GEOM / RotNet (Golan & El-Yaniv, "Deep Anomaly Detection Using Geometric Transformations",
NeurIPS 2018).

1. A set of geometric transformations T_1..T_k: horizontal flip x translation x rotation by a
   multiple of 90 degrees (the paper: 2 x 9 x 4 = 72; translations by a quarter of the image, with
   reflection padding, sec. 4).
2. A CNN learns, on normal images only, to tell which T_i was applied (k-way softmax).
3. Test image x: the network sees T_1(x)..T_k(x). For each i a Dirichlet distribution is fitted to
   the softmax outputs y(T_i(x')) over the normal training images x'; the normality score is the
   summed Dirichlet log-likelihood  sum_i (alpha_i - 1) . log y(T_i(x))  (eq. 3; `score=
   "dirichlet"`), or the simpler mean log-probability of the right transformation, (1/k) sum_i
   log y(T_i(x))_i (`score="simple"`). The anomaly score is its negative.

An image is normal when the network can recognise how it was transformed, which needs the
features it learned from normal images. Known weakness: rotation-symmetric objects (a bottle or a
bolt seen from above, round parts and textures) look the same under every rotation (and
mirror-symmetric ones under every flip). Either the task is unlearnable, so
`recognition_accuracy(normal_images)` stays near 1/k and the scores carry little information
(the tests' centred rings), or the network learns it from other cues (presumably the lighting
and the image frame) that defects do not change: on MVTec AD bottle it recognises
every transformation of the normal test images (accuracy 1.00) yet reaches only 0.76 image AUROC,
against 0.998 for the feature-based `ocsvm` (benchmarks/RESULTS.md). Prefer a feature-based
method for such objects.

Defaults: rotations x flips (k = 8, a ninth of the paper's cost on a CPU; `translation=0.25` gives
the paper's 72), the small `ConvEmbedder` (width 16, about 0.1 M weights) instead of the paper's
Wide-ResNet 16-8, Adam at 1e-3. On held-out Fashion-MNIST *training* images a width of 32 scored
the same as 16 at three times the cost, and the Dirichlet score beat the simple one by 0.02-0.09
AUROC on every class tried.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import digamma, polygamma

from anomalens.components.networks import ConvEmbedder
from anomalens.core.registry import register
from anomalens.core.trained_detector import TrainedDetector
from anomalens.core.training import optimizer_step
from anomalens.data.preprocessing import ImageLike, iter_batches, load_resized
from anomalens.errors import ParameterError

SCORES = ("dirichlet", "simple")


Transformation = tuple[int, int, int, int]


def transformations(rotations: int, flips: bool, translation: float) -> list[Transformation]:
    """The (flip, dx, dy, quarter turns) of every transformation, identity first."""
    shifts = (0, -1, 1) if translation > 0 else (0,)
    return [
        (flip, dx, dy, turns)
        for flip in ((0, 1) if flips else (0,))
        for dx in shifts
        for dy in shifts
        for turns in range(0, 4, 4 // rotations)
    ]


def apply_transformation(
    images: torch.Tensor, transformation: Transformation, shift: int
) -> torch.Tensor:
    """Flip, translate by (dx, dy) * `shift` pixels (reflection padding), then rotate."""
    flip, dx, dy, turns = transformation
    if flip:
        images = images.flip(-1)
    if dx or dy:
        size = images.shape[-1]
        padded = F.pad(images, (shift, shift, shift, shift), mode="reflect")
        top, left = shift - dy * shift, shift - dx * shift
        images = padded[..., top : top + size, left : left + size]
    if turns:
        images = torch.rot90(images, turns, dims=(-2, -1))
    return images


def fit_dirichlet(probabilities: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Maximum-likelihood Dirichlet parameters of rows of `probabilities` (Minka's fixed point)."""
    p = np.clip(probabilities.astype(np.float64), 1e-12, None)
    p /= p.sum(axis=1, keepdims=True)
    mean_log = np.log(p).mean(axis=0)
    mean, var = p.mean(axis=0), p.var(axis=0) + 1e-12
    precision = np.median(np.clip(mean * (1 - mean) / var - 1, 1e-3, None))
    alpha = np.clip(mean * precision, 1e-3, None)
    for _ in range(iterations):
        new = _inverse_digamma(digamma(alpha.sum()) + mean_log)
        if np.allclose(new, alpha, rtol=1e-7, atol=1e-10):
            return new
        alpha = new
    return alpha


def _inverse_digamma(y: np.ndarray, steps: int = 5) -> np.ndarray:
    x = np.where(y >= -2.22, np.exp(y) + 0.5, -1.0 / (y - digamma(1.0)))
    for _ in range(steps):
        x = x - (digamma(x) - y) / polygamma(1, x)
    return x


@register
class RotNet(TrainedDetector):
    """Score = how badly a classifier of geometric transformations recognises them (GEOM)."""

    name = "rotnet"
    produces_maps = False
    fitted_tensors = ("network_", "alphas_")

    def __init__(
        self,
        rotations: int = 4,
        flips: bool = True,
        translation: float = 0.0,
        score: str = "dirichlet",
        width: int = 16,
        max_epochs: int = 20,
        time_budget_s: float | None = None,
        learning_rate: float = 1e-3,
        patience: int = 5,
        *,
        image_size: int = 64,
        target_fpr: float = 0.01,
        pixel_target_fpr: float = 0.001,
        validation_fraction: float = 0.1,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        self._store_params(locals())

    def _check_params(self) -> None:
        if self.rotations not in (1, 2, 4):
            raise ParameterError(f"rotations must be 1, 2 or 4, got {self.rotations}")
        if self.score not in SCORES:
            raise ParameterError(f"score must be one of {SCORES}, got {self.score!r}")
        if not 0 <= self.translation < 0.5:
            raise ParameterError(f"translation must be in [0, 0.5), got {self.translation}")
        if len(self._transformations()) < 2:
            raise ParameterError(
                "rotnet needs at least two transformations: enable rotations or flips"
            )

    def _transformations(self) -> list[Transformation]:
        return transformations(self.rotations, self.flips, self.translation)

    def _build_state(self) -> None:
        self.transformations_ = self._transformations()
        self.shift_ = max(1, round(self.translation * self.image_size))
        self.network_ = ConvEmbedder(len(self.transformations_), self.width).eval()

    def _all_transformed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (k * B, 3, S, S), transformation-major."""
        return torch.cat(
            [apply_transformation(images, t, self.shift_) for t in self.transformations_]
        )

    # ---- fit ---------------------------------------------------------------------------------
    def _fit(self, images: list[ImageLike]) -> None:
        self._check_params()
        self._start_training()
        self._build_state()
        data = load_resized(images, self.image_size)
        count = len(self.transformations_)
        optimizer = torch.optim.Adam(self.network_.parameters(), lr=self.learning_rate)

        def loss(batch: torch.Tensor) -> torch.Tensor:
            targets = torch.arange(count).repeat_interleave(len(batch))
            return F.cross_entropy(self.network_(self._all_transformed(batch)), targets)

        self._train("rotnet", optimizer_step(loss, optimizer), data, [self.network_])
        self.alphas_ = torch.ones(count, count, dtype=torch.float64)
        if self.score == "dirichlet":
            log_probs = []
            with torch.inference_mode():
                for start in range(0, len(data), self.batch_size):
                    batch = data[start : start + self.batch_size].float() / 255.0
                    log_probs.append(self._log_probabilities(batch))
            probabilities = torch.cat(log_probs, dim=1).exp().numpy()
            self.alphas_ = torch.from_numpy(np.stack([fit_dirichlet(p) for p in probabilities]))

    def _log_probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """(k, B, k): log-softmax of the network on each transformation of each image."""
        logits = self.network_(self._all_transformed(pixels))
        return F.log_softmax(logits.double(), dim=1).reshape(
            len(self.transformations_), -1, logits.shape[-1]
        )

    # ---- score -------------------------------------------------------------------------------
    def _score_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        log_probs = self._log_probabilities(pixels)
        if self.score == "dirichlet":
            normality = ((self.alphas_[:, None, :] - 1) * log_probs).sum(dim=(0, 2))
        else:
            count = len(self.transformations_)
            normality = log_probs[torch.arange(count), :, torch.arange(count)].mean(dim=0)
        return -normality, None

    def recognition_accuracy(self, images: list[ImageLike]) -> float:
        """Fraction of the k transformed versions of `images` whose transformation the network
        names correctly. Close to 1/k on the normal images means the task is unlearnable on
        this data (e.g. rotation-symmetric objects) and the scores carry little information;
        a high value does not prove the opposite (see the module docstring on bottles)."""
        self._check_fitted()
        correct, total = 0, 0
        count = len(self.transformations_)
        with torch.inference_mode():
            for batch in iter_batches(images, self.image_size, self.batch_size):
                predicted = self._log_probabilities(batch.pixels).argmax(dim=2)
                correct += int((predicted == torch.arange(count)[:, None]).sum())
                total += predicted.numel()
        return correct / max(total, 1)
