"""`fixed`: a constant cut-off (PRM's official constants: class logit >= 0, peak value > 30).

`strict: true` keeps a candidate only when it **exceeds** the value (`>`), as PRM's official peak test
`peak_val > peak_threshold`; the default `false` keeps one that reaches it (`>=`), as its class test
`aggregation >= class_threshold`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ranprm.prm.thresholds.base import THRESHOLD_RULES, ThresholdRule


@dataclass(frozen=True)
class Fixed(ThresholdRule):
    name: str = "fixed"
    value: float = 0.0
    strict: bool = False  # `>` instead of `>=` (module docstring)

    def _cutoff(self, values: Tensor) -> Tensor:
        return torch.full(values.shape[:-1], float(self.value), device=values.device)


THRESHOLD_RULES.register("fixed", config=Fixed)(Fixed)
