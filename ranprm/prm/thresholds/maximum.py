"""`max`: only the largest candidate (and its ties) is valid; PRM's `filter_type='max'`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ranprm.prm.thresholds.base import THRESHOLD_RULES, ThresholdRule


@dataclass(frozen=True)
class Maximum(ThresholdRule):
    name: str = "max"

    def _cutoff(self, values: Tensor) -> Tensor:
        return values.amax(dim=-1)


THRESHOLD_RULES.register("max", config=Maximum)(Maximum)
