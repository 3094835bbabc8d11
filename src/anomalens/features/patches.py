"""Locally aware multi-layer patch features (PatchCore, Roth et al., CVPR 2022, sec. 3.1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from anomalens.data.preprocessing import ImageLike, iter_batches


def aggregate_patches(
    feature_maps: list[torch.Tensor], neighbourhood: int = 3, damp_border: bool = True
) -> torch.Tensor:
    """Average each map over a `neighbourhood` x `neighbourhood` window (stride 1), upsample every
    map to the finest grid (bilinear) and concatenate the channels: (B, sum C, h, w).

    With `damp_border` (PatchCore's default, as in its reference code), positions outside the
    image count as zero features, so a border patch's feature, and with it its distance to any
    bank patch, is scaled by the fraction of its window inside the image (6/9 along an edge, 4/9
    in a corner for 3x3). Border patches see the CNN's own zero padding and are the noisiest of
    normal images: on magnetic tile their nearest-bank distance is 1.4x the interior's and, when
    averaged over the inside part only, the largest patch score of every normal image lay on the
    border (benchmarks/RESULTS.md, "Border patches"). Without it the window averages only the
    positions inside the image.
    """
    height, width = feature_maps[0].shape[-2:]
    aggregated = []
    for features in feature_maps:
        # Channels-last: the pooling and upsampling kernels run ~4x faster on it (same results),
        # and the (B, h, w, C) patch view taken next is then free.
        features = features.contiguous(memory_format=torch.channels_last)
        if neighbourhood > 1:
            features = F.avg_pool2d(
                features,
                neighbourhood,
                stride=1,
                padding=neighbourhood // 2,
                count_include_pad=damp_border,
            )
        if tuple(features.shape[-2:]) != (height, width):
            features = F.interpolate(
                features, size=(height, width), mode="bilinear", align_corners=False
            )
        aggregated.append(features)
    return torch.cat(aggregated, dim=1)


def flatten_patches(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B * h * w, C), row-major over images then positions."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def pooled_features(feature_maps: list[torch.Tensor]) -> torch.Tensor:
    """One vector per image: each map global-average-pooled, channels concatenated: (B, sum C).

    The image-level representation of the density and one-class methods (e.g. Rippel et al. 2020,
    Bergman et al. 2020).
    """
    return torch.cat([features.mean(dim=(2, 3)) for features in feature_maps], dim=1)


def pooled_dataset_features(
    extractor: torch.nn.Module,
    images: Sequence[ImageLike],
    image_size: int,
    batch_size: int,
    description: str = "features",
) -> torch.Tensor:
    """`pooled_features` of every image, streamed in batches: (N, sum C) float32."""
    vectors = []
    with torch.inference_mode():
        for batch in iter_batches(images, image_size, batch_size, description):
            vectors.append(pooled_features(extractor(batch.pixels)))
    return torch.cat(vectors)


@torch.no_grad()
def backbone_features(
    backbone: torch.nn.Module, images: list, size: int, batch_size: int
) -> list[torch.Tensor]:
    """The backbone's feature maps of every image, computed once: one (N, C, h, w) tensor per
    level. Trained methods on a frozen backbone train on this cache instead of re-running it."""
    levels: list[list[torch.Tensor]] = []
    for batch in iter_batches(images, size, batch_size, "features"):
        for level, features in enumerate(backbone(batch.pixels)):
            if level == len(levels):
                levels.append([])
            levels[level].append(features)
    return [torch.cat(level) for level in levels]
