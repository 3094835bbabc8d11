"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

1. Locally aware patch features from two mid-level stages of a pretrained CNN (sec. 3.1).
2. A memory bank of all training patches, subsampled by a greedy k-center coreset (sec. 3.2).
3. Patch score = distance to the nearest memory-bank patch (exact); the image score is the
   largest patch score, optionally reweighted by how isolated that patch's neighbour is in the
   bank (eq. 7); the anomaly map is the patch scores upsampled and Gaussian-smoothed (sigma 4).

Nothing is trained: `fit` extracts features once and selects the coreset. `backbone="handcrafted"`
uses colour/LBP/gradient-orientation statistics instead of a CNN (`anomalens.features.handcrafted`).
`predict` and the ONNX graph run the same function (`_score_tensors`): the nearest-neighbour
search is a matrix product and a reduction over the bank (3x faster than FAISS's flat index at
predict time for the default ~2,000-patch bank, 1.4-1.8x for 9,000-20,000 patches;
benchmarks/RESULTS.md), and the reweighting gathers each bank patch's neighbours, found with FAISS
at fit (or load) time.

Default `coreset_ratio=0.01`: the paper's PatchCore-1% is within 0.1-0.2 points of the 10% bank on
MVTec AD, while a 10x smaller bank makes the nearest-neighbour search 10x cheaper at predict time
and the coreset selection ~100x cheaper at fit time; raise it for very varied normal data.
"""

from __future__ import annotations

import numpy as np
import torch

from anomalens.components.maps import anomaly_maps
from anomalens.components.neighbors import NearestNeighbors, greedy_coreset, nearest_by_matmul
from anomalens.core.detector import Detector
from anomalens.core.registry import register
from anomalens.data.preprocessing import ImageLike, check_resize
from anomalens.errors import ParameterError
from anomalens.features.backbones import DEFAULT_BACKBONE, create_backbone
from anomalens.features.patches import aggregate_patches, flatten_patches


@register
class PatchCore(Detector):
    """PatchCore: nearest-neighbour distance of patch features to a coreset memory bank."""

    name = "patchcore"
    fitted_fields = ("layers_", "damp_border_")
    """`damp_border_`: border patches damped (`aggregate_patches`); models fitted before it
    existed (no such field in their file) keep the undamped features they were fitted with."""
    fitted_tensors = ("backbone_", "memory_bank_")
    refit_on_all = True

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: tuple[str, ...] | list[str] | None = None,
        weights: str = "auto",
        coreset_ratio: float = 0.01,
        projection_dim: int = 64,
        num_neighbors: int = 9,
        reweight: bool = True,
        smoothing_sigma: float = 4.0,
        *,
        resize: str = "squash",
        image_size: int = 256,
        target_fpr: float = 0.01,
        pixel_target_fpr: float = 0.001,
        validation_fraction: float = 0.1,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        self._store_params(locals())

    # ---- features ----------------------------------------------------------------------------
    @torch.inference_mode()
    def _patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> aggregated patch features (B, D, h, w)."""
        return aggregate_patches(self.backbone_(pixels), damp_border=bool(self.damp_border_))

    # ---- fit ---------------------------------------------------------------------------------
    def _fit(self, images: list[ImageLike]) -> None:
        self._set_bank(self._coreset(images)[0])

    def _fit_and_score_held_out(
        self, images: list[ImageLike], held_out: list[int]
    ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """One feature pass and one coreset over all images; the held-out images are scored
        against the bank without their own patches, as if never seen (leave-out), and the whole
        bank is kept. Cheaper than learning twice, and nothing is held back from the model."""
        bank, sources = self._coreset(images)
        self._set_bank(bank[~np.isin(sources, held_out)])
        result = self._score_all([images[i] for i in held_out], "thresholds")
        self._set_bank(bank)
        self.n_train_images_ = len(images)
        return result

    def _coreset(self, images: list[ImageLike]) -> tuple[np.ndarray, np.ndarray]:
        """The coreset of all patches of `images` and, per coreset patch, its image's index."""
        if not 0 < self.coreset_ratio <= 1:
            raise ParameterError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        check_resize(self.resize)
        self.backbone_ = create_backbone(self.backbone, self.layers, self.weights)
        self.layers_ = list(self.backbone_.layers)
        self.damp_border_ = True
        parts, sources, seen = [], [], 0
        with torch.inference_mode():
            for batch in self._batches(images, "features"):
                patches = flatten_patches(self._patch_features(batch.pixels)).numpy()
                count = len(batch.sizes)
                sources.append(np.repeat(np.arange(seen, seen + count), len(patches) // count))
                parts.append(patches)
                seen += count
        bank, source = np.concatenate(parts), np.concatenate(sources)
        del parts
        if self.coreset_ratio < 1:
            selected = greedy_coreset(bank, self.coreset_ratio, self.projection_dim, self.seed)
            bank, source = bank[selected], source[selected]
        return bank, source

    def _set_bank(self, bank: np.ndarray) -> None:
        """The bank, its squared norms (for the search) and each bank patch's `num_neighbors`
        nearest bank patches (the reweighting's support), found with FAISS a few at a time so
        that it breaks ties the same way on every machine."""
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.memory_bank_ = torch.from_numpy(bank)
        self.squared_norms_ = (self.memory_bank_ * self.memory_bank_).sum(dim=1)
        index = NearestNeighbors(bank)
        support = [
            index.search(bank[start : start + 16], self.num_neighbors)[1]
            for start in range(0, len(bank), 16)
        ]
        self.support_ = torch.from_numpy(np.concatenate(support))

    # ---- score -------------------------------------------------------------------------------
    def _score_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps as one torch function, run by `predict` and exported as the graph."""
        features = self._patch_features(pixels)
        count, dim, height, width = features.shape
        patches = features.permute(0, 2, 3, 1).reshape(count, height * width, dim)
        distances, nearest = nearest_by_matmul(patches, self.memory_bank_, self.squared_norms_)
        scores, best = distances.max(dim=1)
        if self.reweight and self.num_neighbors > 1:
            rows = torch.arange(count)
            support = self.memory_bank_[self.support_[nearest[rows, best]]]
            scores = scores * reweighting(patches[rows, best], support)
        maps = distances.reshape(count, 1, height, width)
        return scores, anomaly_maps(maps, pixels.shape[-2:], self.smoothing_sigma)

    # ---- persistence -------------------------------------------------------------------------
    def _build_state(self) -> None:
        self.backbone_ = create_backbone(self.backbone, self.layers_, "random")

    def _restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """The squared norms and the support are derived from the bank, not saved."""
        super()._restore(tensors)
        self._set_bank(self.memory_bank_.numpy())


def reweighting(test_patches: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Eq. 7: 1 - exp(d(m_test, m*)) / sum over the k bank neighbours m of m* of exp(d(m_test, m)).

    `test_patches` (B, D); `support` (B, k, D): m* (first) and its neighbours in the bank. A test
    patch whose nearest bank patch sits in a dense part of the bank is down-weighted, one near an
    isolated bank patch keeps its score.
    """
    distances = torch.linalg.vector_norm(support - test_patches[:, None, :], dim=-1)
    weights = torch.exp(distances - distances.amax(dim=1, keepdim=True))
    return 1.0 - weights[:, 0] / weights.sum(dim=1)
