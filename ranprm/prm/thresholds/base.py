"""The threshold-rule interface and its registry.

A rule maps candidate values to one cut-off; a candidate is valid when it is `>=` the cut-off (`>` for a rule
whose `strict` option is set: `fixed` has one, for the official peak test `value > 30`). Rules work on the
last dimension, so one call serves a single 1-D set (an image's class scores, one CRM's peak values) and a batch
of them (every map of a CRM batch for the training peak filter):

    rule.cutoff(values)   # values (..., N) -> cut-offs (...); an empty set (N = 0) has cut-off +inf

A new rule is one new module in this package (imported by `ranprm.prm.thresholds`, or named in
`RANPRM_PLUGINS`) holding a frozen dataclass that subclasses `ThresholdRule`, with a field `name: str = "<name>"`,
its options as further fields, and `_cutoff`; decorate it with `@THRESHOLD_RULES.register("<name>", config=Cls)`.
Configs then choose it by `kind`: `threshold.classes: {kind: <name>, <option>: ...}`, `head.peak_filter: <name>`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ranprm.errors import ConfigError
from ranprm.utils.registry import Registry
from ranprm.utils.typed_config import from_mapping

THRESHOLD_RULES: Registry[type[ThresholdRule]] = Registry("threshold rule", "threshold.<role>.kind")


@dataclass(frozen=True)
class ThresholdRule:
    """Base of every rule: `cutoff` handles dtype and empty sets, subclasses implement `_cutoff`."""

    name: str = ""

    def _cutoff(self, values: Tensor) -> Tensor:
        """Cut-offs (...) of a non-empty float tensor (..., N)."""
        raise NotImplementedError

    def cutoff(self, values: Tensor) -> Tensor:
        """The cut-off of each set of candidates along the last dimension: (..., N) -> (...)."""
        values = values.detach().float()
        if values.ndim == 0:
            values = values[None]
        if values.shape[-1] == 0:
            return torch.full(values.shape[:-1], float("inf"), device=values.device)
        return self._cutoff(values)

    def passes(self, values: Tensor, cutoff: Tensor) -> Tensor:
        """Bool mask of `values` that reach `cutoff` (broadcast): `>=`, or `>` for a rule with `strict` set."""
        return values > cutoff if getattr(self, "strict", False) else values >= cutoff

    def valid(self, values: Tensor) -> Tensor:
        """Bool mask of the candidates (..., N) that reach their set's cut-off."""
        return self.passes(values, self.cutoff(values)[..., None])


def build_rule(spec: ThresholdRule | Mapping[str, Any] | str | float, option: str) -> ThresholdRule:
    """A rule from its config: a mapping `{kind: <name>, <options>}`, a rule name, or a number (`fixed`).

    `option` is where the spec came from (e.g. "threshold.classes", "head.peak_filter"), for error messages.
    """
    if isinstance(spec, ThresholdRule):
        return spec
    if isinstance(spec, bool):
        raise ConfigError(f"{option}={spec!r} must be a threshold rule name, a mapping with `kind`, or a number")
    if isinstance(spec, int | float):
        return _entry("fixed", option)(name="fixed", value=float(spec))  # type: ignore[call-arg]
    if isinstance(spec, str):
        try:
            return build_rule(float(spec), option)
        except ValueError:
            return _entry(spec, option)()
    if isinstance(spec, Mapping):
        options = dict(spec)
        if "kind" not in options:
            raise ConfigError(f"{option} needs a `kind` (one of {THRESHOLD_RULES.names()}), got {dict(spec)}")
        kind = str(options.pop("kind"))
        cls = _entry(kind, f"{option}.kind")
        return from_mapping(cls, options, option)
    raise ConfigError(f"{option}={spec!r} must be a threshold rule name, a mapping with `kind`, or a number")


def _entry(kind: str, option: str) -> type[ThresholdRule]:
    if kind not in THRESHOLD_RULES:
        raise ConfigError(f"{option}={kind!r} is not a known threshold rule; choose one of {THRESHOLD_RULES.names()}")
    return THRESHOLD_RULES.get(kind)
