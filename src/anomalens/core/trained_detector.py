"""Base class of the detectors whose networks are trained with `anomalens.core.training.train`."""

from __future__ import annotations

from typing import Any

import torch

from anomalens.core.detector import Detector
from anomalens.core.training import Step, TrainingHistory, train
from anomalens.errors import ParameterError, check_positive


class TrainedDetector(Detector):
    """A detector with networks trained by THE training loop.

    Subclasses set `max_epochs`, `time_budget_s`, `patience` and `learning_rate` in their
    constructor. The summary of each training run (epochs, why it stopped, the loss of each epoch,
    seconds) is kept in `training_` and in the model file's fitted config.
    """

    fitted_fields = ("training_",)
    max_epochs: int
    time_budget_s: float | None
    patience: int
    learning_rate: float

    def _start_training(self) -> None:
        """Check the training parameters and clear the summary of any earlier fit."""
        self.training_: dict[str, Any] = {}
        if int(self.max_epochs) < 1:
            raise ParameterError(f"max_epochs must be at least 1, got {self.max_epochs}")
        if self.time_budget_s is not None:
            check_positive("time_budget_s", self.time_budget_s)
        check_positive("learning_rate", self.learning_rate)

    def _train(
        self,
        name: str,
        step: Step,
        data: torch.Tensor,
        modules: list[torch.nn.Module],
        *,
        max_epochs: int | None = None,
        time_budget_s: float | None = None,
        augment: Any = None,
        patience: int | None = None,
        batch_size: int | None = None,
    ) -> TrainingHistory:
        """Run `anomalens.core.training.train` with this detector's settings; record the summary."""
        history = train(
            step,
            data,
            modules=modules,
            max_epochs=int(max_epochs or self.max_epochs),
            time_budget_s=time_budget_s if time_budget_s is not None else self.time_budget_s,
            batch_size=batch_size or self.batch_size,
            patience=self.patience if patience is None else patience,
            seed=self.seed,
            augment=augment,
            description=f"training {name}",
        )
        self.training_[name] = {
            "epochs": history.epochs,
            "stopped": history.stopped,
            "losses": history.losses,
            "seconds": round(history.seconds, 2),
        }
        return history
