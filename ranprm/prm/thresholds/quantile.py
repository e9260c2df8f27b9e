"""`quantile`: the q-quantile of the candidates, linear interpolation (`torch.quantile`); q = 0.75 is Q3."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ranprm.errors import ConfigError
from ranprm.prm.thresholds.base import THRESHOLD_RULES, ThresholdRule


@dataclass(frozen=True)
class Quantile(ThresholdRule):
    name: str = "quantile"
    q: float = 0.75

    def __post_init__(self) -> None:
        if not 0.0 <= self.q <= 1.0:
            raise ConfigError(f"threshold quantile q={self.q} must lie in [0, 1]")

    def _cutoff(self, values: Tensor) -> Tensor:
        return torch.quantile(values, self.q, dim=-1)


THRESHOLD_RULES.register("quantile", config=Quantile)(Quantile)
