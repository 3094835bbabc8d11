"""The detector shared by the normalizing-flow methods (FastFlow, CFlow).

Backbone features are extracted once per training image (the backbone is frozen) and standardised
per channel with training statistics; one flow per feature level trains on that cache with the
shared loop `anomalens.core.training.train`, minimising the mean negative log-likelihood per
dimension (`anomalens.components.flows.gaussian_nll`). A subclass builds the flow of each level
(`_build_flow`) and says how a level goes through it (`_level_flow`); maps and scores come from
`anomalens.components.flows.nll_to_map`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from anomalens.components.flows import gaussian_nll, nll_to_map
from anomalens.core.trained_detector import TrainedDetector
from anomalens.core.training import optimizer_step
from anomalens.data.preprocessing import ImageLike
from anomalens.errors import AnomalensError
from anomalens.features.backbones import Backbone
from anomalens.features.patches import backbone_features


class FlowDetector(TrainedDetector):
    """Shared fit / score / persistence of the flow detectors (see the module docstring).
    Subclasses declare the parameters: `backbone`, `layers`, `weights`, `flow_steps`, `clamp`,
    `learning_rate`, `max_epochs`, `time_budget_s`, `patience`, `smoothing_sigma`, `intensity` and
    the common ones."""

    fitted_fields = ("training_", "layers_")
    fitted_tensors = ("backbone_", "flows_", "mean_", "std_")
    """`mean_` and `std_`: the standardisation of each level."""

    # ---- what a flow method implements --------------------------------------------------------
    def _build_flow(self, level: int, channels: int, generator: torch.Generator) -> nn.Module:
        raise NotImplementedError

    def _level_flow(self, level: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised features (B, C, h, w) of one level -> z and log-det per position."""
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------------
    def _build(self, weights: str | Path, layers: list[str] | None) -> None:
        if self.flow_steps < 1 or self.clamp <= 0:
            raise AnomalensError(
                f"flow_steps must be >= 1 and clamp > 0, got {self.flow_steps} and {self.clamp}"
            )
        self.backbone_ = Backbone(
            self.backbone, tuple(layers) if layers else None, weights, self.intensity
        )
        self.layers_ = list(self.backbone_.layers)
        generator = torch.Generator().manual_seed(self.seed)
        self.flows_ = nn.ModuleList(
            self._build_flow(level, channels, generator)
            for level, channels in enumerate(self.backbone_.channels)
        )
        self.flows_.eval()

    def _standardise(self, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            (features - mean) / std
            for features, mean, std in zip(feature_maps, self.mean_, self.std_, strict=True)
        ]

    def _level_nll(self, level: int, features: torch.Tensor) -> torch.Tensor:
        """NLL per dimension of every position, (B, h, w)."""
        return gaussian_nll(*self._level_flow(level, features))

    def _nll(self, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        standardised = self._standardise(feature_maps)
        return [self._level_nll(level, f) for level, f in enumerate(standardised)]

    def _fit(self, images: list[ImageLike]) -> None:
        self._start_training()
        self._build(self.weights, self.layers)
        self._fit_features(
            backbone_features(self.backbone_, images, self.image_size, self.batch_size)
        )

    def _fit_features(self, cache: list[torch.Tensor]) -> None:
        """Fit the standardisation and the flows on cached features, one (N, C, h, w) per level."""
        self.mean_ = [f.mean(dim=(0, 2, 3), keepdim=True) for f in cache]
        self.std_ = [f.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6) for f in cache]
        cache = self._standardise(cache)
        optimizer = torch.optim.Adam(
            self.flows_.parameters(), lr=self.learning_rate, weight_decay=1e-5
        )

        def loss(indices: torch.Tensor) -> torch.Tensor:
            levels = [self._level_nll(i, features[indices]) for i, features in enumerate(cache)]
            return torch.stack([nll.mean() for nll in levels]).mean()

        self._train(
            self.name, optimizer_step(loss, optimizer), torch.arange(len(cache[0])), [self.flows_]
        )

    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self._score_features(self.backbone_(pixels))

    def _score_features(self, feature_maps: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        maps = nll_to_map(self._nll(feature_maps), self.image_size, self.smoothing_sigma)
        return maps.amax(dim=(1, 2)).numpy().astype(np.float64), maps.numpy().astype(np.float32)

    def _build_state(self) -> None:
        self._build("random", self.layers_)
