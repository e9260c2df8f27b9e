"""`median`: PRM's median, `torch.median` over the candidates.

PRM's official peak filter (`PeakResponseMapping._median_filter`, ZhouYanzhao/PRM branch `pytorch`) is
`torch.median` of the flattened map, which for an even count returns the **lower** of the two middle values, not
their mean. ranprm has one median, this one, for the training peak filter (`head.peak_filter: median`) and for the
inference thresholds alike, so the training filter matches the official one exactly. `quantile` with q = 0.5
gives the interpolated median (the mean of the middle pair) for those who want that.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ranprm.prm.thresholds.base import THRESHOLD_RULES, ThresholdRule


@dataclass(frozen=True)
class Median(ThresholdRule):
    name: str = "median"

    def _cutoff(self, values: Tensor) -> Tensor:
        return values.median(dim=-1).values


THRESHOLD_RULES.register("median", config=Median)(Median)
