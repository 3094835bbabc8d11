"""A multivariate Gaussian fitted to normal feature vectors, and the Mahalanobis distance to it.

The covariance is shrunk towards a scaled identity with the Ledoit-Wolf estimator: with fewer
images than feature channels the sample covariance is singular (Rippel et al., ICPR 2020, sec.
3.2). Used on pooled pretrained features (`gaussian`) and on self-supervised ones (`cutpaste`, Li et
al., CVPR 2021, whose Gaussian density estimator is the same model).
"""

from __future__ import annotations

import torch
from sklearn.covariance import LedoitWolf


def fit_gaussian(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (C,) and Ledoit-Wolf-shrunk precision matrix (C, C) of the rows of `vectors` (N, C),
    both float64."""
    estimator = LedoitWolf(assume_centered=False).fit(vectors.double().numpy())
    return torch.from_numpy(estimator.location_), torch.from_numpy(estimator.get_precision())


def mahalanobis(vectors: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance (N,) float64 of each row of `vectors` to the Gaussian."""
    centred = vectors.double() - mean
    return ((centred @ precision) * centred).sum(dim=1).clamp_min(0.0).sqrt()
