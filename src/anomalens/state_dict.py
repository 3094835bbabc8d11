"""A model file's flat tensor dict: each part of a model keeps its state under `part.`
(``backbone.``, ``network.``, ``flows.``, ``detector.``), and `FittedState` makes that dict the
state dict of one module."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

Part = torch.Tensor | list[torch.Tensor] | nn.Module | None


class FittedState(nn.Module):
    """Named parts of a fitted model as one module: a tensor as a buffer, a list of tensors as
    buffers ``0``, ``1``... of a child, a network as a submodule; None parts are left out. Its
    state dict is the model file's tensors, and `load_state_dict` checks that a file holds every
    key and no other."""

    def __init__(self, parts: Mapping[str, Part]) -> None:
        super().__init__()
        for key, part in parts.items():
            if isinstance(part, list):
                part = FittedState({str(i): tensor for i, tensor in enumerate(part)})
            if isinstance(part, nn.Module):
                self.add_module(key, part)
            else:
                self.register_buffer(key, part)


def stored_part(key: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """The tensor `key` of a model file's `tensors`, or the list saved as ``key.0``, ``key.1``...
    (KeyError when there is neither)."""
    if key in tensors:
        return tensors[key]
    numbered = under_prefix(key, tensors)
    if not numbered:
        raise KeyError(key)
    return [numbered[str(i)] for i in range(len(numbered))]


def with_prefix(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` keyed ``prefix.key``."""
    return {f"{prefix}.{key}": value for key, value in tensors.items()}


def under_prefix(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``prefix.*`` entries of `tensors`, keyed without ``prefix.``."""
    start = len(prefix) + 1
    return {key[start:]: value for key, value in tensors.items() if key.startswith(prefix + ".")}
