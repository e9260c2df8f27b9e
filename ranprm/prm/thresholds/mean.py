"""`mean`: the mean of the candidates (the RAN-PRM paper's rule for peaks)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ranprm.prm.thresholds.base import THRESHOLD_RULES, ThresholdRule


@dataclass(frozen=True)
class Mean(ThresholdRule):
    name: str = "mean"

    def _cutoff(self, values: Tensor) -> Tensor:
        return values.mean(dim=-1)


THRESHOLD_RULES.register("mean", config=Mean)(Mean)
