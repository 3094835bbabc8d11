"""A multivariate Gaussian fitted to normal feature vectors, and the Mahalanobis distance to it.

The covariance is shrunk towards a scaled identity with the Ledoit-Wolf estimator: with fewer
images than feature channels the sample covariance is singular (Rippel et al., ICPR 2020, sec.
3.2). Used on pooled pretrained features (`gaussian`) and on self-supervised ones (`cutpaste`, Li et
al., CVPR 2021, whose Gaussian density estimator is the same model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def fit_gaussian(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (C,) and Ledoit-Wolf-shrunk precision matrix (C, C) of the rows of `vectors` (N, C),
    both float64."""
    from sklearn.covariance import LedoitWolf  # scikit-learn only where fitted (1.8 s to import)

    estimator = LedoitWolf(assume_centered=False).fit(vectors.double().numpy())
    return torch.from_numpy(estimator.location_), torch.from_numpy(estimator.get_precision())


def mahalanobis(vectors: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance (N,) float64 of each row of `vectors` to the Gaussian."""
    centred = vectors.double() - mean
    return ((centred @ precision) * centred).sum(dim=1).clamp_min(0.0).sqrt()


@dataclass
class Moments:
    """Running sums of vectors x, from which the mean and covariance of all vectors added so far
    follow exactly, so that adding two halves in turn gives what adding the whole does (up to
    float rounding): the pairwise update of Chan, Golub & LeVeque (1979) with a common shift.

    The sums are of y = x - `shift`, the first vectors' mean, kept fixed: sums of nearly centred
    values keep float rounding small. Leading dimensions are independent sets of vectors (PaDiM:
    one per patch position). `weighted` (sum |y|^2 y) and `quartic` (sum |y|^4), when kept, are
    what the Ledoit-Wolf shrinkage needs besides the covariance (`ledoit_wolf_precision`).
    """

    count: torch.Tensor
    """Number of vectors, a float64 scalar tensor."""
    shift: torch.Tensor
    total: torch.Tensor
    scatter: torch.Tensor
    weighted: torch.Tensor | None = None
    quartic: torch.Tensor | None = None

    @classmethod
    def start(cls, vectors: torch.Tensor, fourth: bool = False) -> Moments:
        """Empty sums, shifted by the mean of `vectors` (..., n, d); `fourth`: keep the sums of
        the fourth moments too."""
        shift = vectors.mean(dim=-2)
        dim = shift.shape[-1]
        return cls(
            count=torch.zeros((), dtype=torch.float64),
            shift=shift,
            total=torch.zeros_like(shift),
            scatter=shift.new_zeros((*shift.shape, dim)),
            weighted=torch.zeros_like(shift) if fourth else None,
            quartic=shift.new_zeros(shift.shape[:-1]) if fourth else None,
        )

    def add(self, vectors: torch.Tensor) -> None:
        """Add vectors (..., n, d) to the sums, in place."""
        centred = vectors - self.shift.unsqueeze(-2)
        self.count += centred.shape[-2]
        self.total += centred.sum(dim=-2)
        self.scatter += centred.transpose(-1, -2) @ centred
        if self.weighted is not None and self.quartic is not None:
            squared_norms = (centred * centred).sum(dim=-1, keepdim=True)
            self.weighted += (squared_norms * centred).sum(dim=-2)
            self.quartic += (squared_norms * squared_norms).sum(dim=(-2, -1))

    def mean(self) -> torch.Tensor:
        return self.shift + self.total / self.count

    def covariance(self, ddof: int = 1) -> torch.Tensor:
        """The covariance of all vectors added, divided by count - `ddof` (at least 1)."""
        mean = self.total / self.count
        outer = mean.unsqueeze(-1) * mean.unsqueeze(-2)
        return (self.scatter - self.count * outer) / max(float(self.count) - ddof, 1.0)


def ledoit_wolf_precision(moments: Moments) -> torch.Tensor:
    """The precision matrix (d, d) float64 of the Ledoit-Wolf-shrunk covariance of the vectors
    summed in `moments` (kept with their fourth moments): what `fit_gaussian` gives on the
    vectors themselves (sklearn's estimator; Ledoit & Wolf 2004), computed from the sums."""
    count = float(moments.count)
    moment_names = ("total", "scatter", "weighted", "quartic")
    total, scatter, weighted, quartic = (getattr(moments, n).double() for n in moment_names)
    mean = total / count  # of y = x - shift
    norm = mean @ mean
    covariance = scatter / count - torch.outer(mean, mean)  # biased, as sklearn's
    dim = covariance.shape[0]
    trace = float(torch.trace(covariance))
    shrinkage = 0.0
    if dim > 1:
        # sum over vectors of |y - mean|^4, expanded into the sums kept
        fourth = (
            quartic
            - 4 * mean @ weighted
            + 4 * mean @ scatter @ mean
            + 2 * norm * torch.trace(scatter)
            - 4 * norm * (mean @ total)
            + count * norm * norm
        )
        delta_ = float((covariance * covariance).sum())
        mu = trace / dim
        beta = (float(fourth) / count - delta_) / (dim * count)
        delta = (delta_ - 2 * mu * trace + dim * mu * mu) / dim
        beta = min(beta, delta)
        shrinkage = 0.0 if beta == 0 else beta / delta
    shrunk = (1 - shrinkage) * covariance
    shrunk.diagonal().add_(shrinkage * trace / dim)
    return torch.linalg.pinv(shrunk, hermitian=True)
