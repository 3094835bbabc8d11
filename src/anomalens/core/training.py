"""The one training loop every gradient-trained detector uses (plain PyTorch, no Lightning).

`train` owns what users of a CPU care about: seeded shuffling, a progress bar with epoch, loss and
time left, `max_epochs`, a wall-clock `time_budget_s`, and early stopping when the epoch loss stops
improving. What one optimisation step does is the method's business: it passes a `step` callable
(see `optimizer_step` for the common single-loss case; a GAN passes its own two-player step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from anomalens.progress import make_progress

Step = Callable[[torch.Tensor], float]
"""Takes one batch (already augmented), updates the model, returns the batch loss."""


@dataclass
class TrainingHistory:
    """What happened during training: per-epoch mean loss, and why it stopped."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = "max_epochs"

    @property
    def epochs(self) -> int:
        return len(self.losses)


def optimizer_step(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer
) -> Step:
    """A `Step` for the usual case: one loss, one optimiser."""

    def step(batch: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def train(
    step: Step,
    data: torch.Tensor,
    *,
    modules: list[nn.Module],
    max_epochs: int,
    time_budget_s: float | None = None,
    batch_size: int = 32,
    patience: int = 5,
    min_improvement: float = 1e-3,
    seed: int = 0,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    description: str = "training",
) -> TrainingHistory:
    """Run `step` over shuffled mini-batches of `data` for up to `max_epochs` epochs.

    data: (N, ...) tensor; uint8 images are converted to float in [0, 1] per batch.
    Stops early when the epoch loss has not improved by a relative `min_improvement` for `patience`
    epochs, or before an epoch that would overrun `time_budget_s` (and within an epoch, after the
    batch that overran it: a first epoch longer than the budget is cut short, its loss being the
    mean over the batches it ran). `modules` are put in train mode for the loop and back in eval
    mode after it.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    history = TrainingHistory()
    best, stale = math.inf, 0
    started = time.perf_counter()
    for module in modules:
        module.train()
    try:
        with make_progress() as progress:
            task = progress.add_task(description, total=max_epochs, info="")
            for epoch in range(max_epochs):
                elapsed = time.perf_counter() - started
                if (
                    time_budget_s is not None
                    and epoch
                    and elapsed / epoch * (epoch + 1) > time_budget_s
                ):
                    history.stopped = "time_budget"
                    break
                total, count = 0.0, 0
                for indices in torch.randperm(len(data), generator=generator).split(batch_size):
                    batch = data[indices]
                    if batch.dtype == torch.uint8:
                        batch = batch.float() / 255.0
                    if augment is not None:
                        batch = augment(batch, generator)
                    total += step(batch) * len(indices)
                    count += len(indices)
                    if (
                        time_budget_s is not None
                        and time.perf_counter() - started > time_budget_s
                        and count < len(data)
                    ):
                        history.stopped = "time_budget"
                        break
                loss = total / max(count, 1)
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"{description}: loss became {loss} in epoch {epoch + 1}"
                    )
                history.losses.append(loss)
                elapsed = time.perf_counter() - started
                remaining = elapsed / (epoch + 1) * (max_epochs - epoch - 1)
                if time_budget_s is not None:
                    remaining = min(remaining, max(0.0, time_budget_s - elapsed))
                progress.update(
                    task,
                    completed=epoch + 1,
                    info=f"epoch {epoch + 1} loss {loss:.4g} ~{remaining:.0f}s left",
                )
                if history.stopped == "time_budget":
                    break
                if not math.isfinite(best) or loss < best - abs(best) * min_improvement:
                    best, stale = loss, 0
                else:
                    stale += 1
                    if stale >= patience:
                        history.stopped = "plateau"
                        break
    finally:
        for module in modules:
            module.eval()
        history.seconds = time.perf_counter() - started
    return history
