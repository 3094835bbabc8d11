"""One-class SVM (Schoelkopf et al., "Estimating the Support of a High-Dimensional
Distribution", Neural Computation 2001) on pooled pretrained CNN features.

1. Each image becomes one vector: the global-average-pooled feature maps of the two deepest
   stages (stride 16 and 32) of an ImageNet-pretrained backbone, L2-normalised (cosine geometry,
   the usual choice for deep features).
2. scikit-learn's `OneClassSVM` with an RBF kernel k(x, x') = exp(-gamma ||x - x'||^2) finds the
   smallest-weight function sum_i alpha_i k(x_i, .) that is >= rho on all but a fraction `nu` of
   the normal training vectors.
3. Anomaly score = -sum_i alpha_i k(x_i, x): low kernel mass near the support vectors = anomalous.

Defaults, chosen without test data:
- `gamma="nn"`: 1 / the mean squared distance of each training vector to its nearest other
  training vector, so the kernel width is the local spacing of the normal data. The common median
  heuristic (1 / median pairwise distance) is about three times wider on deep features and blurs
  neighbouring classes together; a width at the sample spacing keeps the support tight without
  the degenerate limit of gamma -> infinity. `gamma="scale"` (scikit-learn's) or a float also work.
- `nu=0.1`: an upper bound on the fraction of training images treated as outliers (and a lower
  bound on the fraction of support vectors); it tolerates a little contamination of the "normal"
  set. With a kernel this narrow, the ranking of test images barely depends on it.
"""

from __future__ import annotations

import numpy as np
import torch

from anomalens.components.neighbors import NearestNeighbors
from anomalens.core.detector import Detector
from anomalens.core.registry import register
from anomalens.data.preprocessing import ImageLike
from anomalens.errors import DataError, ParameterError
from anomalens.features.backbones import (
    DEFAULT_BACKBONE,
    IMAGE_LEVEL_STRIDES,
    Backbone,
    create_backbone,
    layers_with_strides,
)
from anomalens.features.patches import pooled_dataset_features, pooled_features


def nearest_neighbour_gamma(features: np.ndarray) -> float:
    """1 / mean squared distance from each row to its nearest other row."""
    distances, _ = NearestNeighbors(features).search(features, 2)
    spacing = float(np.mean(distances[:, 1] ** 2))
    if spacing <= 0:
        raise DataError("all training feature vectors are identical: cannot set the kernel width")
    return 1.0 / spacing


@register
class OneClassSVM(Detector):
    """One-class SVM (RBF kernel) on pooled, L2-normalised pretrained features."""

    name = "ocsvm"
    fitted_fields = ("layers_", "gamma_")
    fitted_tensors = ("backbone_", "support_vectors_", "dual_coef_")
    produces_maps = False

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: tuple[str, ...] | list[str] | None = None,
        weights: str = "auto",
        nu: float = 0.1,
        gamma: float | str = "nn",
        normalize: bool = True,
        *,
        image_size: int = 224,
        target_fpr: float = 0.01,
        pixel_target_fpr: float = 0.001,
        validation_fraction: float = 0.1,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        self._store_params(locals())

    def _features(self, vectors: torch.Tensor | np.ndarray) -> torch.Tensor:
        vectors = torch.as_tensor(vectors, dtype=torch.float32)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=1)
        return vectors

    # ---- fit ---------------------------------------------------------------------------------
    def _fit(self, images: list[ImageLike]) -> None:
        if not 0 < self.nu <= 1:
            raise ParameterError(f"nu must be in (0, 1], got {self.nu}")
        layers = (
            tuple(self.layers)
            if self.layers
            else layers_with_strides(self.backbone, IMAGE_LEVEL_STRIDES)
        )
        self.backbone_ = Backbone(self.backbone, layers, self.weights)
        self.layers_ = list(self.backbone_.layers)
        raw = pooled_dataset_features(self.backbone_, images, self.image_size, self.batch_size)
        features = self._features(raw).numpy()
        if self.gamma == "nn":
            self.gamma_ = nearest_neighbour_gamma(features)
        elif self.gamma == "scale":  # scikit-learn's default
            self.gamma_ = 1.0 / (features.shape[1] * float(features.var()))
        elif isinstance(self.gamma, int | float) and self.gamma > 0:
            self.gamma_ = float(self.gamma)
        else:
            raise ParameterError(f"gamma must be 'nn', 'scale' or a number > 0, got {self.gamma!r}")
        from sklearn.svm import OneClassSVM  # imported where fitted (1.8 s to import)

        svm = OneClassSVM(kernel="rbf", nu=self.nu, gamma=self.gamma_).fit(features)
        self.support_vectors_ = torch.from_numpy(svm.support_vectors_.astype(np.float32))
        self.dual_coef_ = torch.from_numpy(svm.dual_coef_[0].astype(np.float32))

    # ---- score -------------------------------------------------------------------------------
    def _score_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        features = self._features(pooled_features(self.backbone_(pixels)))
        squared = (features[:, None, :] - self.support_vectors_).square().sum(dim=-1)
        return -(torch.exp(-self.gamma_ * squared) @ self.dual_coef_), None

    # ---- persistence -------------------------------------------------------------------------
    def _build_state(self) -> None:
        self.backbone_ = create_backbone(self.backbone, self.layers_, "random")
