"""Locally aware patch features: the border damping of PatchCore's aggregation."""

from __future__ import annotations

import torch

from anomalens.features.patches import aggregate_patches


def test_border_patches_are_scaled_by_the_part_of_their_window_inside_the_image() -> None:
    ones = torch.ones(1, 2, 6, 8)
    damped = aggregate_patches([ones])[0, 0]
    assert torch.allclose(damped[2:-2, 2:-2], torch.tensor(1.0))
    assert torch.allclose(damped[0, 3], torch.tensor(6 / 9))  # edge
    assert torch.allclose(damped[3, -1], torch.tensor(6 / 9))
    assert torch.allclose(damped[0, 0], torch.tensor(4 / 9))  # corner
    assert torch.allclose(damped[-1, -1], torch.tensor(4 / 9))
    # Without damping the window averages only its inside positions: a constant stays constant.
    assert torch.allclose(aggregate_patches([ones], damp_border=False), torch.tensor(1.0))


def test_damping_shrinks_border_distances_in_proportion() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 4, 5, 5, generator=generator)
    interior = slice(1, -1)
    plain = [aggregate_patches([x], damp_border=False)[0] for x in (a, b)]
    damped = [aggregate_patches([x])[0] for x in (a, b)]
    # Inside the image both agree; at a corner the damped difference is 4/9 of the plain one.
    assert torch.allclose(damped[0][:, interior, interior], plain[0][:, interior, interior])
    corner = (damped[0] - damped[1])[:, 0, 0]
    assert torch.allclose(corner, 4 / 9 * (plain[0] - plain[1])[:, 0, 0], atol=1e-6)


def test_coarser_maps_are_brought_to_the_finest_grid() -> None:
    fine, coarse = torch.rand(2, 3, 8, 8), torch.rand(2, 5, 4, 4)
    out = aggregate_patches([fine, coarse])
    assert out.shape == (2, 8, 8, 8)
