"""CutPaste (Li, Sohn, Yoon & Pfister, "CutPaste: Self-Supervised Learning for Anomaly Detection
and Localization", CVPR 2021), image level.

1. Self-supervision (sec. 3.1): a network learns to tell normal images from the same images with
   a CutPaste defect (a rectangle cut out, colour-jittered and pasted elsewhere) and, in the
   paper's 3-way variant (the default, `variant="3way"`), with a CutPaste-Scar (a thin rotated
   rectangle); `anomalens.data.augment` makes the defects. `variant="cutpaste"` or `"scar"`
   trains the binary variants.
2. Network: an ImageNet-pretrained CNN (the paper fine-tunes ResNet-18; here the offline
   `tf_efficientnet_lite0`), its global-average-pooled stride-16 and stride-32 stages as the
   representation f(x), a two-layer MLP projection head (ReLU, no batch norm) and a linear
   classifier over the 2 or 3 classes, trained with cross-entropy by THE training loop
   (`anomalens.core.training.train`, the defects made by its seeded generator).
3. Scoring (sec. 3.2): a Gaussian density estimator on f(x) of the normal training images (mean
   and Ledoit-Wolf-shrunk covariance, `anomalens.components.density`); the anomaly score is the
   Mahalanobis distance (the Gaussian's negative log-density up to a constant and a monotone
   map). The density sits on the representation before the head, as in the public implementations.

CPU defaults, for a fit of a few minutes on 2 cores (MVTec bottle, 188 training images):
- 224-pixel input (the paper: 256).
- The stem and the stages of stride <= 8 stay frozen (`freeze_stride=8`; 0 fine-tunes
  everything, 16 only the last stages): that skips the backward pass where it costs most (the
  large maps) and keeps low-level filters that a few epochs on a few hundred images would not
  improve. Every batch norm keeps its ImageNet statistics (a few dozen steps are too few to
  re-estimate them, and training and scoring then compute the same function); the unfrozen
  stages still train their scale and shift.
- 6 epochs of Adam at 1e-4 (the paper: 256 epochs of SGD on a GPU), early stop after 3 epochs
  without improvement, at most `time_budget_s=300` s of training. Batches of 16 normal images,
  each with its CutPaste and Scar versions (48 images per step). When the budget, not
  `max_epochs`, ends training, the same seed no longer guarantees the same model (the model file
  records which ended it).

Image-level only: `anomaly_map` is None. `classification_accuracy(images)` says whether the
pretext task was learned.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from anomalens.components.density import fit_gaussian, mahalanobis
from anomalens.core.registry import register
from anomalens.core.trained_detector import TrainedDetector
from anomalens.core.training import optimizer_step
from anomalens.data.augment import cutpaste, cutpaste_scar
from anomalens.data.preprocessing import ImageLike, iter_batches, load_resized
from anomalens.errors import ParameterError, check_choice
from anomalens.features.backbones import (
    DEFAULT_BACKBONE,
    IMAGE_LEVEL_STRIDES,
    Backbone,
    feature_levels,
    layers_with_strides,
)
from anomalens.features.handcrafted import HANDCRAFTED
from anomalens.features.patches import pooled_features
from anomalens.state_dict import Part

Defect = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]

VARIANTS: dict[str, tuple[Defect, ...]] = {
    "3way": (cutpaste, cutpaste_scar),
    "cutpaste": (cutpaste,),
    "scar": (cutpaste_scar,),
}
"""The synthetic defect classes each variant learns to tell from normal images (class 0)."""


class CutPasteNetwork(nn.Module):
    """Backbone -> pooled representation f(x) -> MLP projection head -> linear classifier."""

    def __init__(self, backbone: Backbone, classes: int, head_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        channels = sum(backbone.channels)
        hidden = max(head_dim, min(512, channels))
        self.head = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, head_dim), nn.ReLU()
        )
        self.classifier = nn.Linear(head_dim, classes)

    def representation(self, pixels: torch.Tensor) -> torch.Tensor:
        """f(x): the pooled backbone features the Gaussian density is fitted on."""
        return pooled_features(self.backbone(pixels))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.representation(pixels)))

    def train(self, mode: bool = True) -> CutPasteNetwork:
        """Train mode, except that the backbone's batch norms keep their ImageNet statistics:
        with small CPU batches and few steps, training and scoring then compute the same
        function (their scale and shift are still trained in the unfrozen stages)."""
        super().train(mode)
        self.backbone.eval()
        return self


def freeze_early_stages(backbone: Backbone, stride: int) -> int:
    """Freeze the backbone's parameters up to the end of its last feature level of stride <=
    `stride` (the stem included); return how many parameter tensors were frozen."""
    levels = feature_levels(backbone.name)  # in stride order
    frozen = [module for module, level_stride, _ in levels if level_stride <= stride]
    if not frozen:
        return 0
    parameters = list(backbone.network.named_parameters())  # in forward order
    last = max(i for i, (name, _) in enumerate(parameters) if name.startswith(frozen[-1] + "."))
    for _, parameter in parameters[: last + 1]:
        parameter.requires_grad_(False)
    return last + 1


@register
class CutPaste(TrainedDetector):
    """Score = Mahalanobis distance of a CutPaste-trained representation to the normal images'."""

    name = "cutpaste"
    produces_maps = False
    fitted_tensors = ("mean_", "precision_")

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str = "auto",
        variant: str = "3way",
        freeze_stride: int = 8,
        head_dim: int = 128,
        max_epochs: int = 6,
        time_budget_s: float | None = 300.0,
        patience: int = 3,
        learning_rate: float = 1e-4,
        *,
        image_size: int = 224,
        target_fpr: float = 0.01,
        pixel_target_fpr: float = 0.001,
        validation_fraction: float = 0.1,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        self._store_params(locals())

    def _build(self, backbone: Backbone) -> None:
        self.network_ = CutPasteNetwork(backbone, 1 + len(VARIANTS[self.variant]), self.head_dim)
        self.network_.eval()

    def _with_defects(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, ...) normal images -> (k * B, ...): the images, then each defect class of them."""
        defects = [defect(batch, generator)[0] for defect in VARIANTS[self.variant]]
        return torch.cat([batch, *defects])

    # ---- fit ---------------------------------------------------------------------------------
    def _fit(self, images: list[ImageLike]) -> None:
        self._start_training()
        check_choice("variant", self.variant, tuple(VARIANTS))
        if int(self.freeze_stride) < 0:
            raise ParameterError(f"freeze_stride must be >= 0, got {self.freeze_stride}")
        if self.backbone == HANDCRAFTED:
            raise ParameterError("cutpaste fine-tunes a CNN: backbone='handcrafted' has no weights")
        layers = layers_with_strides(self.backbone, IMAGE_LEVEL_STRIDES)
        backbone = Backbone(self.backbone, layers, self.weights)
        freeze_early_stages(backbone, int(self.freeze_stride))
        self._build(backbone)
        data = load_resized(images, self.image_size)
        classes = 1 + len(VARIANTS[self.variant])
        trainable = [p for p in self.network_.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=self.learning_rate)

        def loss(batch: torch.Tensor) -> torch.Tensor:
            targets = torch.arange(classes).repeat_interleave(len(batch) // classes)
            return F.cross_entropy(self.network_(batch), targets)

        self._train(
            "cutpaste",
            optimizer_step(loss, optimizer),
            data,
            [self.network_],
            augment=self._with_defects,
        )
        with torch.inference_mode():
            vectors = torch.cat(
                [
                    self.network_.representation(data[start : start + self.batch_size] / 255.0)
                    for start in range(0, len(data), self.batch_size)
                ]
            )
        self.mean_, self.precision_ = fit_gaussian(vectors)

    # ---- score -------------------------------------------------------------------------------
    def _score_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        return mahalanobis(self.network_.representation(pixels), self.mean_, self.precision_), None

    def classification_accuracy(self, images: list[ImageLike]) -> float:
        """How often the trained classifier tells `images` from their CutPaste (and Scar)
        versions (seeded defects): near 1 means the self-supervised task was learned, near
        1/k that it was not."""
        self._check_fitted()
        generator = torch.Generator().manual_seed(self.seed)
        correct, total = 0, 0
        with torch.inference_mode():
            for batch in iter_batches(images, self.image_size, self.batch_size):
                predicted = self.network_(self._with_defects(batch.pixels, generator)).argmax(1)
                targets = torch.arange(len(predicted)) // len(batch.pixels)
                correct += int((predicted == targets).sum())
                total += len(predicted)
        return correct / max(total, 1)

    # ---- persistence -------------------------------------------------------------------------
    def _fitted_parts(self, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, Part]:
        """The network's parts are saved at the top level: ``backbone.*``, ``head.*``,
        ``classifier.*``."""
        return {**dict(self.network_.named_children()), **super()._fitted_parts(tensors)}

    def _build_state(self) -> None:
        layers = layers_with_strides(self.backbone, IMAGE_LEVEL_STRIDES)
        self._build(Backbone(self.backbone, layers, "random"))
