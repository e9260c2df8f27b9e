"""Threshold rules by name, and the inference selection of valid classes and peaks built on them.

Rules (one module each, registered in `THRESHOLD_RULES`): `fixed` (a constant), `mean`, `median` (PRM's
`torch.median`: the lower middle value for an even count), `quantile` (`q`, linear interpolation; q = 0.75 is
Q3), `max`, `none`. The same rules serve the inference thresholds (`threshold.classes`, `threshold.peaks`) and the
training peak filter (`head.peak_filter`, PRM's median), so each name means one thing everywhere.
See `base` for the interface (a new rule is one new file) and `selection` for where the rules are applied.
"""

from ranprm.prm.thresholds.base import THRESHOLD_RULES, ThresholdRule, build_rule
from ranprm.prm.thresholds.selection import (
    CLASS_DISTRIBUTIONS,
    ClassCalibration,
    Thresholds,
    select_classes,
    select_peaks,
)
from ranprm.utils.registry import import_submodules

import_submodules(__name__)  # every rule module registers itself

__all__ = [
    "CLASS_DISTRIBUTIONS",
    "THRESHOLD_RULES",
    "ClassCalibration",
    "ThresholdRule",
    "Thresholds",
    "build_rule",
    "select_classes",
    "select_peaks",
]
