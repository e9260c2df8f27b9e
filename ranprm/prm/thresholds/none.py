"""`none`: every candidate is valid (cut-off -inf); `head.peak_filter: none` keeps every local maximum."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ranprm.prm.thresholds.base import THRESHOLD_RULES, ThresholdRule


@dataclass(frozen=True)
class NoThreshold(ThresholdRule):
    name: str = "none"

    def _cutoff(self, values: Tensor) -> Tensor:
        return torch.full(values.shape[:-1], float("-inf"), device=values.device)


THRESHOLD_RULES.register("none", config=NoThreshold)(NoThreshold)
