"""Deep nearest-neighbour anomaly detection (Bergman, Cohen & Hoshen, "Deep Nearest Neighbor
Anomaly Detection", arXiv:2002.10445, 2020).

1. Every image is represented by the global-average-pooled features of the last stage of an
   ImageNet-pretrained CNN (the paper: ResNet after its final pooling), with no fine-tuning.
2. The anomaly score is the mean Euclidean distance to the `k` nearest normal training images
   (the paper's default k = 2), found exactly with FAISS; the exported ONNX graph does the same
   search as a matrix product and a top-k (`anomalens.components.neighbors.k_nearest_by_matmul`).

Image-level only: `anomaly_map` is None. The model keeps every training image's vector, so
`partial_fit` appends the new images' vectors (no subsampling, as in `fit`).
"""

from __future__ import annotations

import numpy as np
import torch

from anomalens.components.neighbors import NearestNeighbors, k_nearest_by_matmul
from anomalens.core.detector import Detector
from anomalens.core.registry import register
from anomalens.data.preprocessing import ImageLike
from anomalens.errors import ParameterError
from anomalens.features.backbones import DEFAULT_BACKBONE, create_backbone, feature_levels
from anomalens.features.patches import pooled_dataset_features, pooled_features


@register
class KNN(Detector):
    """Mean distance to the k nearest normal images in pooled pretrained-feature space."""

    name = "knn"
    fitted_fields = ("layers_",)
    fitted_tensors = ("backbone_", "features_")
    """`features_`: the training images' pooled feature vectors."""
    produces_maps = False

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: tuple[str, ...] | list[str] | None = None,
        weights: str = "auto",
        k: int = 2,
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
        if self.k < 1:
            raise ParameterError(f"k must be at least 1, got {self.k}")
        layers = self.layers or [feature_levels(self.backbone)[-1][0]]
        self.backbone_ = create_backbone(self.backbone, layers, self.weights, self.intensity)
        self.layers_ = list(self.backbone_.layers)
        self._set_features(self._vectors(images))

    def _update(self, images: list[ImageLike]) -> None:
        self._set_features(torch.cat([self.features_, self._vectors(images)]))

    def _vectors(self, images: list[ImageLike]) -> torch.Tensor:
        vectors = pooled_dataset_features(self.backbone_, images, self.image_size, self.batch_size)
        return vectors.float().contiguous()

    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, None]:
        vectors = pooled_features(self.backbone_(pixels)).numpy()
        distances, _ = self.index_.search(vectors, self.k)
        return distances.mean(axis=1), None

    def _score_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The exported graph's version of `_score_batch`: the same exact search written as a
        matrix product and a top-k, which ONNX can hold."""
        vectors = pooled_features(self.backbone_(pixels))
        features = self.features_
        k = min(self.k, len(features))
        distances = k_nearest_by_matmul(vectors, features, (features * features).sum(dim=1), k)
        return distances.mean(dim=1), None

    def _build_state(self) -> None:
        self.backbone_ = create_backbone(self.backbone, self.layers_, "random", self.intensity)

    def _restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """The search index is built from the features, not saved."""
        super()._restore(tensors)
        self._set_features(self.features_)

    def _set_features(self, features: torch.Tensor) -> None:
        self.features_ = features
        self.index_ = NearestNeighbors(features.numpy())
