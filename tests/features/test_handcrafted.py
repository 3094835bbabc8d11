"""Handcrafted features: the Backbone interface without a network, and what each channel means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalens.errors import WeightsError
from anomalens.features.backbones import create_backbone, feature_levels, layers_with_strides
from anomalens.features.handcrafted import CHANNELS, LBP_CODES, HandcraftedFeatures


def stripes(vertical: bool, size: int = 64) -> torch.Tensor:
    """(1, 3, size, size) stripes of period 4, vertical or horizontal."""
    ramp = (torch.arange(size) // 2 % 2).float() * 0.6 + 0.2
    pattern = ramp.expand(size, size) if vertical else ramp[:, None].expand(size, size)
    return pattern.expand(1, 3, size, size).clone()


def test_factory_gives_the_backbone_interface() -> None:
    extractor = create_backbone("handcrafted")
    assert isinstance(extractor, HandcraftedFeatures)
    assert extractor.layers == ("cells8", "cells16") and extractor.strides == (8, 16)
    assert extractor.channels == (CHANNELS, CHANNELS) and extractor.state_dict() == {}
    maps = extractor(torch.rand(2, 3, 64, 48))
    assert [tuple(m.shape) for m in maps] == [(2, CHANNELS, 8, 6), (2, CHANNELS, 4, 3)]
    assert all(torch.isfinite(m).all() for m in maps)
    assert layers_with_strides("handcrafted", (4, 8, 16)) == ("cells4", "cells8", "cells16")
    assert [level[1] for level in feature_levels("handcrafted")] == [4, 8, 16, 32]
    with pytest.raises(WeightsError, match="no feature layer 'cells5'"):
        create_backbone("handcrafted", ["cells5"])


def test_channels_describe_colour_texture_and_edge_orientation() -> None:
    extractor = HandcraftedFeatures(("cells8",))
    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 0.8
    (features,) = extractor(red)
    centre = features[0, :, 2, 2]
    np.testing.assert_allclose(centre[:3].numpy(), [0.8, 0.0, 0.0], atol=1e-5)  # colour mean
    np.testing.assert_allclose(centre[3:6].numpy(), 0.0, atol=1e-3)  # colour spread
    # LBP histogram (square-rooted) of a flat patch: unit norm, one code.
    lbp = centre[6 : 6 + LBP_CODES]
    assert lbp.pow(2).sum().item() == pytest.approx(1.0, abs=1e-5)
    (vertical,) = extractor(stripes(True))
    (horizontal,) = extractor(stripes(False))
    orientation = slice(6 + LBP_CODES, -1)
    v, h = vertical[0, orientation, 4, 4], horizontal[0, orientation, 4, 4]
    assert v.argmax() != h.argmax(), "edge orientation must tell the stripes apart"
    # Same colour statistics and the same amount of edges: only the orientation differs.
    torch.testing.assert_close(vertical[0, :6, 4, 4], horizontal[0, :6, 4, 4])
    assert vertical[0, -1, 4, 4].item() == pytest.approx(horizontal[0, -1, 4, 4].item(), rel=1e-4)
