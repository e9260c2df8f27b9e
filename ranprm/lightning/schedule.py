"""The per-step cosine learning-rate schedule, resumable with a different run length.

A cosine from the optimizer's lr down to 0 at the run's last step. Torch's `CosineAnnealingLR` keeps its length
(`T_max`) in the checkpoint: a run resumed with a larger `trainer.max_epochs` went past `T_max`, and its lr climbed
back from 0 to its peak. Here a resumed run's schedule is the cosine of its new length (`retarget`): from the resumed
step on, the lr is what a run planned with that length from the start has at that step, decreasing to 0 at the new
last step. A run resumed with its own length is unchanged (an exact resume stays exact); a longer one goes on at
the higher lr of the longer cosine (a finished run's lr was 0: extending it must train), a shorter one at the lower.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class CosineToZero(torch.optim.lr_scheduler.LRScheduler):
    """lr(step) = base_lr * (1 + cos(pi * min(step, total_steps) / total_steps)) / 2, recomputed from the step (no
    recurrence), so a new `total_steps` takes effect at once. `total_steps` is saved with the checkpoint."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, last_epoch: int = -1) -> None:
        self.total_steps = max(1, int(total_steps))
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(max(step, 0), self.total_steps) / self.total_steps))

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def retarget(self, total_steps: int) -> bool:
        """End the cosine at `total_steps` from now on, and set the optimizer's lr to its value at the current step;
        False when the length is unchanged."""
        total_steps = max(1, int(total_steps))
        if total_steps == self.total_steps:
            return False
        if total_steps <= self.last_epoch:
            raise ValueError(f"cannot end the schedule at step {total_steps}: step {self.last_epoch} is already done")
        self.total_steps = total_steps
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        return True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        if "T_max" in state:  # a checkpoint written with torch's CosineAnnealingLR (earlier ranprm): the same curve
            state = {k: v for k, v in state.items() if k not in ("T_max", "eta_min")} | {"total_steps": state["T_max"]}
        super().load_state_dict(state)
