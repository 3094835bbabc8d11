"""Key prefixes in a model file's flat tensor dict: each part of a model keeps its state under
`part.` (``backbone.``, ``network.``, ``flows.``, ``detector.``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def with_prefix(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` keyed ``prefix.key``."""
    return {f"{prefix}.{key}": value for key, value in tensors.items()}


def under_prefix(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``prefix.*`` entries of `tensors`, keyed without ``prefix.``."""
    start = len(prefix) + 1
    return {key[start:]: value for key, value in tensors.items() if key.startswith(prefix + ".")}
