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

Big banks (`bank_index`): above `pq_min_bank` patches (50,000 by default; `auto`), or when asked
(`pq`, `ivfpq`), predict searches a FAISS product-quantised copy of the bank (an inverted file
first for `ivfpq`) for each patch's `rerank` candidates, and takes the nearest of them by its exact
distance to the full-precision bank, which stays the model file's bank; the reweighting is then as
above. The index is built (seeded) from the bank at fit, partial_fit and load, so the model file
is the same. The exported ONNX graph keeps the exact search (`flat`): the export is the exact
model whatever `bank_index` says.

Bounded memory: the images are read in shards of `shard_images`. One shard (the default for up to
500 images) is the paper's exact coreset of all patches. With more, each shard's patches are
reduced to a greedy coreset of `SHARD_OVERSAMPLING` x `coreset_ratio` of them, and one greedy pass
over the union of the shard coresets keeps `coreset_ratio` of all patches seen, so peak memory
depends on the shard size, not on the number of images. A union of more than
`FINAL_PASS_PATCHES` is reduced in consecutive groups of shards, so that the fit's time grows
linearly with the number of images (a single pass would grow as its square). `partial_fit` is
the same mechanism: the new images' shard coresets join the bank and the greedy pass keeps
`coreset_ratio` of all patches seen so far (`n_patches_`). The shards' work (features, shard
coreset) goes through `shard_map`: in this process, one shard after another, unless a distributed
engine supplies one (`anomalens.deploy.ray_fit` runs the shards on Ray actors); the final pass is
the same either way.

Default `coreset_ratio=0.01`: the paper's PatchCore-1% is within 0.1-0.2 points of the 10% bank on
MVTec AD, while a 10x smaller bank makes the nearest-neighbour search 10x cheaper at predict time
and the coreset selection ~100x cheaper at fit time; raise it for very varied normal data.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from anomalens.components.maps import anomaly_maps
from anomalens.components.neighbors import (
    COMPRESSED_INDEXES,
    CompressedIndex,
    NearestNeighbors,
    greedy_coreset,
    nearest_by_matmul,
    nearest_by_rerank,
    nearest_distances,
)
from anomalens.core.detector import Detector
from anomalens.core.registry import register
from anomalens.core.thresholds import TailQuantile
from anomalens.data.preprocessing import RESIZE_AUTO, RESIZE_MODES, ImageLike, check_resize
from anomalens.errors import ParameterError
from anomalens.features.backbones import DEFAULT_BACKBONE, create_backbone
from anomalens.features.patches import aggregate_patches, flatten_patches

BANK_INDEXES = ("auto", "flat", *COMPRESSED_INDEXES)
"""The `bank_index` choices."""

MIN_COMPRESSED_BANK = 64
"""Smaller banks are searched exactly whatever `bank_index` says."""

SHARD_OVERSAMPLING = 2
"""A shard keeps twice the final ratio of its patches, for the union's greedy pass to choose
from."""

SUPPORT_EXACT_TIES = 50_000
"""Banks up to this size get their reweighting support found a few patches at a time
(`PatchCore._set_bank`)."""

FINAL_PASS_PATCHES = 32_768
"""The most shard-coreset patches one greedy pass reduces: its time grows as the square of its
input, so bigger unions are reduced in consecutive groups of about this size (each to
`coreset_ratio` of the patches its shards saw), which keeps the fit's time linear in the number
of images."""


@dataclass
class ShardCoreset:
    """One shard's part of the coreset: its coreset patches (all its patches when it is not
    reduced), each patch's image index, and how many patches the shard had."""

    patches: np.ndarray
    sources: np.ndarray
    seen: int


Shards = list[tuple[int, list[ImageLike]]]
"""Shards of images, each with the index of its first image among all the images."""

ShardMap = Callable[["PatchCore", Shards, bool], Iterable[ShardCoreset]]
"""Runs `PatchCore.shard_coreset` on each shard (the bool: `reduce`) and yields the results in
shard order."""


def final_groups(sizes: list[int], limit: int) -> list[slice]:
    """Consecutive groups of the parts of `sizes` patches, each at most `limit` patches unless one
    part alone is larger; one group when they all fit."""
    groups, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if total and total + size > limit:
            groups.append(slice(start, index))
            start, total = index, 0
        total += size
    return [*groups, slice(start, len(sizes))]


def local_shards(model: PatchCore, shards: Shards, reduce: bool) -> Iterator[ShardCoreset]:
    """The shards in this process, one after another: one shard's patches in memory at a time."""
    for offset, images in shards:
        yield model.shard_coreset(images, offset, reduce)


@register
class PatchCore(Detector):
    """PatchCore: nearest-neighbour distance of patch features to a coreset memory bank."""

    name = "patchcore"
    fitted_fields = ("layers_", "damp_border_", "n_patches_", "resize_")
    """`damp_border_`: border patches damped (`aggregate_patches`); models fitted before it
    existed (no such field in their file) keep the undamped features they were fitted with.
    `n_patches_`: patches seen by fit and partial_fit, which the bank is `coreset_ratio` of.
    `resize_`: what `resize` resolved to at fit (`auto`: `resolve_resize`)."""
    fitted_tensors = ("backbone_", "memory_bank_")
    refit_on_all = True
    shard_map: ShardMap | None = None
    """How the shards are run (`ShardMap`); None: `local_shards`. Not a parameter: a distributed
    engine sets it on the instance for the length of a fit."""

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
        shard_images: int = 500,
        bank_index: str = "auto",
        pq_min_bank: int = 50_000,
        rerank: int = 32,
        *,
        resize: str = "auto",
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
    @torch.inference_mode()
    def _patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> aggregated patch features (B, D, h, w)."""
        return aggregate_patches(self.backbone_(pixels), damp_border=bool(self.damp_border_))

    # ---- fit ---------------------------------------------------------------------------------
    def _fit(self, images: list[ImageLike]) -> None:
        self._start()
        self._set_bank(self._coreset(images)[0])

    def _fit_and_score_held_out(
        self, images: list[ImageLike], held_out: list[int]
    ) -> tuple[np.ndarray, TailQuantile | None]:
        """One feature pass and one coreset over all images; the held-out images are scored
        against the bank without their own patches, as if never seen (leave-out), and the whole
        bank is kept. Cheaper than learning twice, and nothing is held back from the model."""
        self._start()
        bank, sources = self._coreset(images)
        self._set_bank(bank[~np.isin(sources, held_out)])
        result = self._score_held_out([images[i] for i in held_out])
        self._set_bank(bank)
        self.n_train_images_ = len(images)
        return result

    def _update(self, images: list[ImageLike]) -> None:
        """The bank and the new images' patches, reduced to `coreset_ratio` of all patches seen.
        A model file from before `n_patches_` was kept counts its bank as `coreset_ratio` of
        the patches it saw."""
        if self.n_patches_ is None:
            self.n_patches_ = round(len(self.memory_bank_) / self.coreset_ratio)
        self._set_bank(self._coreset(images, self.memory_bank_.numpy())[0])

    def _start(self) -> None:
        """Check the parameters and build the backbone for a new bank."""
        if not 0 < self.coreset_ratio <= 1:
            raise ParameterError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.shard_images < 1:
            raise ParameterError(f"shard_images must be at least 1, got {self.shard_images}")
        self._check_bank_index()
        check_resize(self.resize, (*RESIZE_MODES, RESIZE_AUTO))
        self.backbone_ = create_backbone(
            self.backbone, self.layers, self.weights, self.intensity, self.input_mode == "letterbox"
        )
        self.layers_ = list(self.backbone_.layers)
        self.damp_border_ = True
        self.n_patches_ = 0

    def _coreset(
        self, images: list[ImageLike], bank: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The coreset of all patches of `images` and of the earlier ones that `bank` holds
        (`coreset_ratio` of all patches seen) and, per coreset patch, its image's index (-1 for
        the bank's). Each shard of `shard_images` images is reduced to its own coreset first,
        unless the images are one shard and there is no bank: then it is the exact coreset."""
        starts = range(0, len(images), self.shard_images)
        reduce = len(starts) > 1 or bank is not None
        parts = []
        if bank is not None:
            parts.append(ShardCoreset(bank, np.full(len(bank), -1), self.n_patches_))
        shards = [(start, images[start : start + self.shard_images]) for start in starts]
        for shard in (self.shard_map or local_shards)(self, shards, reduce):
            self.n_patches_ += shard.seen
            parts.append(shard)
        groups = final_groups([len(part.patches) for part in parts], FINAL_PASS_PATCHES)
        kept = [self._group_coreset(parts[group]) for group in groups]
        if len(kept) == 1:
            return kept[0]
        return np.concatenate([k[0] for k in kept]), np.concatenate([k[1] for k in kept])

    def _group_coreset(self, parts: list[ShardCoreset]) -> tuple[np.ndarray, np.ndarray]:
        """The greedy coreset of the union of `parts` keeping `coreset_ratio` of the patches they
        saw (the whole union when that is no fewer). One part (the exact coreset) is used as it
        is: no copy of every patch."""
        union = parts[0].patches if len(parts) == 1 else np.concatenate([p.patches for p in parts])
        source = np.concatenate([p.sources for p in parts])
        size = max(1, round(sum(p.seen for p in parts) * self.coreset_ratio))
        if size < len(union):
            selected = greedy_coreset(
                union, self.coreset_ratio, self.projection_dim, self.seed, size=size
            )
            union, source = union[selected], source[selected]
        return union, source

    def shard_coreset(
        self, images: list[ImageLike], offset: int, reduce: bool = True
    ) -> ShardCoreset:
        """One shard's work: the patch features of `images` (the first is image `offset` of
        all) and, if `reduce`, their greedy coreset of `SHARD_OVERSAMPLING` x `coreset_ratio`."""
        patches, source = self._patches(images, offset)
        seen = len(patches)
        if reduce:
            keep = greedy_coreset(
                patches,
                min(1.0, SHARD_OVERSAMPLING * self.coreset_ratio),
                self.projection_dim,
                self.seed,
                "shard coreset",
            )
            patches, source = patches[keep], source[keep]
        return ShardCoreset(patches, source, seen)

    def _patches(self, images: list[ImageLike], offset: int) -> tuple[np.ndarray, np.ndarray]:
        """All patch features of `images` and, per patch, its image's index (from `offset`)."""
        parts, sources, seen = [], [], offset
        with torch.inference_mode():
            for batch in self._batches(images, "features"):
                patches = flatten_patches(self._patch_features(batch.pixels)).numpy()
                count = len(batch.sizes)
                sources.append(np.repeat(np.arange(seen, seen + count), len(patches) // count))
                parts.append(patches)
                seen += count
        return np.concatenate(parts), np.concatenate(sources)

    def _set_bank(self, bank: np.ndarray) -> None:
        """The bank, its squared norms (for the search) and each bank patch's `num_neighbors`
        nearest bank patches (the reweighting's support), found with FAISS a few at a time so
        that it breaks ties the same way on every machine; banks of more than
        `SUPPORT_EXACT_TIES` patches are searched in large blocks (FAISS's matrix-product path,
        whose ties may fall differently on another CPU): 16 at a time, the support of a
        185,000-patch bank had not been found after 10 minutes."""
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.memory_bank_ = torch.from_numpy(bank)
        self.squared_norms_ = (self.memory_bank_ * self.memory_bank_).sum(dim=1)
        index = NearestNeighbors(bank)
        step = 16 if len(bank) <= SUPPORT_EXACT_TIES else 4096
        support = [
            index.search(bank[start : start + step], self.num_neighbors)[1]
            for start in range(0, len(bank), step)
        ]
        self.support_ = torch.from_numpy(np.concatenate(support))
        self._bank_search = None
        self._compressed_index()

    def resolved_bank_index(self) -> str:
        """The search `bank_index` means for the current bank: `auto` is `flat` below
        `pq_min_bank` patches and `ivfpq` from there on; a bank under `MIN_COMPRESSED_BANK`
        patches, too small to train a quantiser on, is always searched exactly."""
        self._check_bank_index()
        size = len(self.memory_bank_)
        if size < MIN_COMPRESSED_BANK or self.bank_index == "flat":
            return "flat"
        if self.bank_index != "auto":
            return self.bank_index
        return "flat" if size < self.pq_min_bank else "ivfpq"

    def _check_bank_index(self) -> None:
        if self.bank_index not in BANK_INDEXES:
            raise ParameterError(
                f"bank_index must be one of {', '.join(BANK_INDEXES)}, got {self.bank_index!r}"
            )
        if self.pq_min_bank < 0:
            raise ParameterError(f"pq_min_bank must be at least 0, got {self.pq_min_bank}")
        if self.rerank < 1:
            raise ParameterError(f"rerank must be at least 1, got {self.rerank}")

    def _compressed_index(self) -> CompressedIndex | None:
        """The FAISS index that proposes the `rerank` candidates, None for the exact search.
        Derived from the bank (like `squared_norms_`, never saved) and seeded; rebuilt only when
        the parameters that choose it changed since."""
        kind = self.resolved_bank_index()
        if kind == "flat":
            return None
        cached = getattr(self, "_bank_search", None)
        if cached is None or cached[0] != (kind, self.seed):
            index = CompressedIndex(self.memory_bank_.numpy(), kind, self.seed)
            self._bank_search = cached = ((kind, self.seed), index)
        return cached[1]

    # ---- score -------------------------------------------------------------------------------
    def _score_tensors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps as one torch function, run by `predict` and exported as the graph.
        With a compressed `bank_index`, predict re-ranks its candidates; the export keeps the
        exact search (ONNX has no FAISS operator), so an exported model is the exact one."""
        exporting = torch.compiler.is_exporting()
        index = None if exporting else self._compressed_index()
        features = self._patch_features(pixels)
        count, dim, height, width = features.shape
        patches = features.permute(0, 2, 3, 1).reshape(count, height * width, dim)
        bank, norms = self.memory_bank_, self.squared_norms_
        nearest = None
        if exporting:  # the exact search, without an index per patch: only the worst needs one
            distances = nearest_distances(patches, bank, norms)
        elif index is None:
            distances, nearest = nearest_by_matmul(patches, bank, norms)
        else:
            distances, nearest = nearest_by_rerank(patches, bank, index, self.rerank)
        scores, best = distances.max(dim=1)
        if self.reweight and self.num_neighbors > 1:
            rows = torch.arange(count)
            worst = patches[rows, best]
            closest = (
                nearest_by_matmul(worst, bank, norms)[1] if nearest is None else nearest[rows, best]
            )
            scores = scores * reweighting(worst, bank[self.support_[closest]])
        maps = distances.reshape(count, 1, height, width)
        return scores, anomaly_maps(maps, pixels.shape[-2:], self.smoothing_sigma)

    def exported_model(self) -> PatchCore:
        """The exact-search model (a shallow copy with `bank_index="flat"`) when the bank is
        searched through a compressed index: the ONNX graph keeps the exact search."""
        if self.resolved_bank_index() == "flat":
            return self
        return copy.copy(self).set_params(bank_index="flat")

    # ---- persistence -------------------------------------------------------------------------
    def _build_state(self) -> None:
        self.backbone_ = create_backbone(
            self.backbone, self.layers_, "random", self.intensity, self.input_mode == "letterbox"
        )

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
