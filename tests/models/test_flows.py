"""Normalizing-flow detectors (FastFlow, CFlow) and their shared parts, on tiny synthetic data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import anomalens
from anomalens.components.flows import build_flow, gaussian_nll, nll_to_map, positional_encoding
from anomalens.data.mvtec import test_samples, training_images
from anomalens.evaluation.metrics import image_auroc

SMALL = {"flow_steps": 4, "max_epochs": 3, "image_size": 128, "time_budget_s": None}


@pytest.fixture(scope="module", params=["fastflow", "cflow"])
def fitted_flow(request, brick: Path):
    """A flow detector fitted on the synthetic brick category (128 px, short training)."""
    return anomalens.create(request.param, **SMALL).fit(training_images(brick))


def _tiny_flow(channels: int = 4, condition: int = 0) -> nn.Module:
    def subnet(step: int, inputs: int, outputs: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(inputs + condition, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, outputs, 1)
        )

    return build_flow(channels, 3, subnet, 2.0, torch.Generator().manual_seed(0))


def test_log_determinant_is_exact() -> None:
    """The flow's summed log-det equals log|det J| of its Jacobian (random, non-zero subnets)."""
    torch.manual_seed(0)
    flow = _tiny_flow().double()
    for block in flow.blocks:
        nn.init.normal_(block.log_scale)
    x = torch.randn(1, 4, 2, 3, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v)[0], x).reshape(24, 24)
    _, log_det = flow(x)
    assert torch.allclose(log_det.sum(), torch.linalg.slogdet(jacobian)[1], atol=1e-8)


def test_nll_of_standard_normal_identity_flow() -> None:
    """Zero z and log-det -> NLL per dimension is log(2 pi) / 2, the normal density's peak."""
    nll = gaussian_nll(torch.zeros(2, 6, 3, 3), torch.zeros(2, 3, 3))
    assert torch.allclose(nll, torch.full((2, 3, 3), 0.5 * math.log(2 * math.pi)))


def test_clamped_scales_keep_extreme_inputs_finite() -> None:
    flow = _tiny_flow()
    with torch.no_grad():
        for layer in flow.modules():
            if isinstance(layer, nn.Conv2d):
                layer.weight.fill_(1e3)
        for x in (torch.full((1, 4, 3, 3), 1e6), torch.full((1, 4, 3, 3), -1e6)):
            z, log_det = flow(x)
            assert torch.isfinite(z).all() and torch.isfinite(log_det).all()
            # 3 blocks x 2 transformed channels x |s| < clamp (the global scales start at 0)
            assert log_det.abs().max() <= 3 * 2 * 2.0


def test_nll_to_map_upsamples_and_combines_levels() -> None:
    fine = torch.zeros(2, 8, 8)
    coarse = torch.zeros(2, 4, 4)
    coarse[1, 1, 1] = 10.0
    maps = nll_to_map([fine, coarse], 32, sigma=1.0)
    assert maps.shape == (2, 32, 32)
    assert maps[1].max() > maps[0].max()
    peak = np.unravel_index(int(maps[1].argmax()), (32, 32))
    assert 8 <= peak[0] < 16 and 8 <= peak[1] < 16


def test_positional_encoding_tells_positions_apart() -> None:
    encoding = positional_encoding(16, 5, 7)
    assert encoding.shape == (16, 5, 7)
    vectors = encoding.reshape(16, -1).T
    distances = torch.cdist(vectors, vectors) + torch.eye(35) * 1e3
    assert distances.min() > 1e-3
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding(6, 2, 2)


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("fastflow", {"flow_steps": 0}, "flow_steps"),
        ("fastflow", {"clamp": -1.0}, "clamp"),
        ("cflow", {"condition_dims": 6}, "condition_dims"),
    ],
)
def test_bad_parameters_are_clear_errors(name: str, params: dict, field: str) -> None:
    images = [np.zeros((32, 32, 3), np.uint8)] * 2
    with pytest.raises(anomalens.AnomalensError, match=field):
        anomalens.create(name, weights="random", **params).fit(images)


def test_detects_synthetic_defects(fitted_flow, brick: Path) -> None:
    samples = test_samples(brick)
    predictions = fitted_flow.predict([s.path for s in samples])
    labels = [s.label for s in samples]
    assert image_auroc(labels, [p.score for p in predictions]) >= 0.9
    assert predictions[0].anomaly_map.shape == (128, 128)
    losses = fitted_flow.training_[fitted_flow.name]["losses"]
    assert losses[-1] < losses[0]


def test_constant_and_dark_images_give_finite_results(fitted_flow) -> None:
    images = [
        np.zeros((128, 128, 3), np.uint8),
        np.full((128, 128, 3), 255, np.uint8),
        np.full((96, 160, 3), 128, np.uint8),
        np.zeros((64, 64), np.uint8),
    ]
    for prediction in fitted_flow.predict(images):
        assert np.isfinite(prediction.score)
        assert np.isfinite(prediction.anomaly_map).all()
