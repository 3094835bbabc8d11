"""The shared training loop: learning, early stopping, time budget, determinism."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from anomalens.core.training import optimizer_step, train


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    data = torch.randn(256, 4)
    target = torch.tensor([1.0, -2.0, 0.5, 3.0])
    model = nn.Linear(4, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        return ((model(batch)[:, 0] - batch @ target) ** 2).mean()

    return model, data, optimizer_step(loss_fn, optimizer)


def test_learns_and_restores_eval_mode() -> None:
    model, data, step = _problem()
    history = train(step, data, modules=[model], max_epochs=30, patience=100)
    assert history.epochs == 30 and history.stopped == "max_epochs"
    assert history.losses[-1] < 0.01 * history.losses[0]
    assert not model.training


def test_stops_on_plateau() -> None:
    model, data, _ = _problem()
    history = train(lambda batch: 1.0, data, modules=[model], max_epochs=50, patience=3)
    assert history.stopped == "plateau" and history.epochs == 4


def test_respects_time_budget() -> None:
    model, data, _ = _problem()

    def slow(batch: torch.Tensor) -> float:
        time.sleep(0.01)
        return 1.0 / (1 + time.perf_counter())

    history = train(
        slow, data, modules=[model], max_epochs=100, time_budget_s=0.5, batch_size=64, patience=1000
    )
    assert history.stopped == "time_budget"
    assert history.seconds < 0.8


def test_same_seed_same_weights() -> None:
    weights = []
    for _ in range(2):
        model, data, step = _problem()
        train(step, data, modules=[model], max_epochs=3, seed=7)
        weights.append(model.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_nan_loss_is_an_error() -> None:
    model, data, _ = _problem()
    with pytest.raises(FloatingPointError, match="loss became nan"):
        train(lambda batch: float("nan"), data, modules=[model], max_epochs=2)


def test_time_budget_cuts_a_long_first_epoch() -> None:
    model, data, _ = _problem()

    def slow(batch: torch.Tensor) -> float:
        time.sleep(0.1)
        return 1.0

    history = train(
        slow, data, modules=[model], max_epochs=5, time_budget_s=0.25, batch_size=16, patience=9
    )
    assert history.stopped == "time_budget" and history.epochs == 1
    assert history.seconds < 0.8  # one epoch would take 16 x 0.1 s
