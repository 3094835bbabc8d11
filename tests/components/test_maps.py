"""Anomaly-map post-processing: the matrix form of upsampling + smoothing against the plain
upsampling and convolutions (which the ONNX graph runs)."""

from __future__ import annotations

import pytest
import torch

from anomalens.components.maps import anomaly_maps, gaussian_blur, resize_maps


@pytest.mark.parametrize(
    ("coarse", "size", "sigma"),
    [
        ((32, 32), (256, 256), 4.0),  # PatchCore's default
        ((16, 24), (256, 384), 4.0),  # not square
        ((3, 5), (7, 40), 4.0),  # axes shorter than the kernel radius: edge repeated
        ((64, 64), (64, 64), 4.0),  # no resizing
        ((8, 8), (64, 64), 0.0),  # no smoothing
    ],
)
def test_anomaly_maps_match_upsampling_then_blurring(coarse, size, sigma) -> None:
    scores = torch.rand(2, 1, *coarse, generator=torch.Generator().manual_seed(0)) + 0.5
    expected = gaussian_blur(resize_maps(scores, size), sigma)[:, 0]
    torch.testing.assert_close(anomaly_maps(scores, size, sigma), expected, rtol=1e-5, atol=0)
