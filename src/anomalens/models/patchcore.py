"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

1. Locally aware patch features from two mid-level stages of a pretrained CNN (sec. 3.1).
2. A memory bank of all training patches, subsampled by a greedy k-center coreset (sec. 3.2).
3. Patch score = distance to the nearest memory-bank patch (exact, FAISS); the image score is the
   largest patch score, optionally reweighted by how isolated that patch's neighbour is in the
   bank (eq. 7); the anomaly map is the patch scores upsampled and Gaussian-smoothed (sigma 4).

Nothing is trained: `fit` extracts features once and selects the coreset. `backbone="handcrafted"`
uses colour/LBP/gradient-orientation statistics instead of a CNN (`anomalens.handcrafted`).
`export_module` gives the same computation as one graph for ONNX: the nearest-neighbour search
becomes a matrix product and a reduction over the bank, and the reweighting gathers each bank
patch's neighbours, precomputed at export time.

Default `coreset_ratio=0.01`: the paper's PatchCore-1% is within 0.1-0.2 points of the 10% bank on
MVTec AD, while a 10x smaller bank makes the nearest-neighbour search 10x cheaper at predict time
and the coreset selection ~100x cheaper at fit time; raise it for very varied normal data.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from anomalens.backbones import (
    DEFAULT_BACKBONE,
    backbone_tensors,
    create_backbone,
    restore_backbone,
)
from anomalens.errors import ParameterError
from anomalens.features import aggregate_patches, flatten_patches
from anomalens.models.base import Detector
from anomalens.neighbors import NearestNeighbors, greedy_coreset, nearest_by_matmul
from anomalens.ops import anomaly_maps
from anomalens.preprocessing import ImageLike, check_resize
from anomalens.progress import make_progress
from anomalens.registry import register


@register
class PatchCore(Detector):
    """PatchCore: nearest-neighbour distance of patch features to a coreset memory bank."""

    name = "patchcore"
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
        return aggregate_patches(self.backbone_(pixels))

    # ---- fit ---------------------------------------------------------------------------------
    def _fit(self, images: list[ImageLike]) -> None:
        self._set_bank(*self._coreset(images))

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
        self.layers = list(self.backbone_.layers)
        parts, sources, seen = [], [], 0
        with make_progress() as progress:
            task = progress.add_task("features", total=len(images), info="")
            for batch in self._batches(images):
                patches = flatten_patches(self._patch_features(batch.pixels)).numpy()
                count = len(batch.sizes)
                sources.append(np.repeat(np.arange(seen, seen + count), len(patches) // count))
                parts.append(patches)
                seen += count
                progress.advance(task, count)
        bank, source = np.concatenate(parts), np.concatenate(sources)
        del parts
        if self.coreset_ratio < 1:
            selected = greedy_coreset(bank, self.coreset_ratio, self.projection_dim, self.seed)
            bank, source = bank[selected], source[selected]
        return bank, source

    def _set_bank(self, bank: np.ndarray) -> None:
        self.memory_bank_ = np.ascontiguousarray(bank)
        self.index_ = NearestNeighbors(self.memory_bank_)

    # ---- score -------------------------------------------------------------------------------
    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        features = self._patch_features(pixels)
        count, _, height, width = features.shape
        patches = flatten_patches(features).numpy()
        _, nearest = self.index_.search(patches, 1)
        # The exact |m_test - m*|: FAISS's expanded form |q|^2 - 2 q.m + |m|^2 loses precision.
        distances = np.linalg.norm(patches - self.memory_bank_[nearest[:, 0]], axis=1)
        patch_scores = distances.reshape(count, height * width)
        best = patch_scores.argmax(axis=1)
        scores = patch_scores[np.arange(count), best]
        if self.reweight and self.num_neighbors > 1:
            scores = scores * self._reweighting(
                patches.reshape(count, height * width, -1)[np.arange(count), best],
                nearest[:, 0].reshape(count, -1)[np.arange(count), best],
            )
        maps = torch.from_numpy(patch_scores.reshape(count, 1, height, width))
        return scores, anomaly_maps(maps, pixels.shape[-2:], self.smoothing_sigma).numpy()

    def _reweighting(self, test_patches: np.ndarray, bank_indices: np.ndarray) -> np.ndarray:
        """Eq. 7 weights of the test patches whose nearest bank patches are `bank_indices`."""
        _, support = self.index_.search(self.memory_bank_[bank_indices], self.num_neighbors)
        weights = reweighting(
            torch.from_numpy(test_patches), torch.from_numpy(self.memory_bank_[support])
        )
        return weights.numpy()

    # ---- export ------------------------------------------------------------------------------
    def export_module(self) -> nn.Module:
        self._check_fitted()
        return PatchCoreGraph(self)

    # ---- persistence -------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "memory_bank": torch.from_numpy(self.memory_bank_),
            **backbone_tensors(self.backbone_),
        }

    def _restore(self, tensors: dict[str, torch.Tensor]) -> None:
        self.backbone_ = restore_backbone(self.backbone, self.layers, tensors)
        self._set_bank(tensors["memory_bank"].numpy().astype(np.float32))


def reweighting(test_patches: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Eq. 7: 1 - exp(d(m_test, m*)) / sum over the k bank neighbours m of m* of exp(d(m_test, m)).

    `test_patches` (B, D); `support` (B, k, D): m* (first) and its neighbours in the bank. A test
    patch whose nearest bank patch sits in a dense part of the bank is down-weighted, one near an
    isolated bank patch keeps its score.
    """
    distances = torch.linalg.vector_norm(support - test_patches[:, None, :], dim=-1)
    weights = torch.exp(distances - distances.amax(dim=1, keepdim=True))
    return 1.0 - weights[:, 0] / weights.sum(dim=1)


class PatchCoreGraph(nn.Module):
    """A fitted PatchCore as one traceable module: pixels (B, 3, S, S) in [0, 1] -> image scores
    (B,) and anomaly maps (B, S, S), the bank search done by `nearest_by_matmul`."""

    def __init__(self, model: PatchCore) -> None:
        super().__init__()
        self.backbone = model.backbone_
        self.sigma = model.smoothing_sigma
        bank = torch.from_numpy(model.memory_bank_.copy())
        self.register_buffer("bank", bank)
        self.register_buffer("squared_norms", (bank * bank).sum(dim=1))
        self.reweight = model.reweight and model.num_neighbors > 1
        if self.reweight:
            # Each bank patch's neighbours, searched a few at a time as `_reweighting` does at
            # predict time, so FAISS takes the same exact path and breaks ties the same way.
            support = [
                model.index_.search(model.memory_bank_[start : start + 16], model.num_neighbors)[1]
                for start in range(0, len(model.memory_bank_), 16)
            ]
            self.register_buffer("support", torch.from_numpy(np.concatenate(support)))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = aggregate_patches(self.backbone(pixels))
        count, dim, height, width = features.shape
        patches = features.permute(0, 2, 3, 1).reshape(count, height * width, dim)
        distances, nearest = nearest_by_matmul(patches, self.bank, self.squared_norms)
        scores, best = distances.max(dim=1)
        if self.reweight:
            rows = torch.arange(count)
            support = self.bank[self.support[nearest[rows, best]]]
            scores = scores * reweighting(patches[rows, best], support)
        maps = distances.reshape(count, 1, height, width)
        maps = anomaly_maps(maps, pixels.shape[-2:], self.sigma)
        return scores, maps
