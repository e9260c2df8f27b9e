"""Threshold strategies: the seed's dynamic rule for which classes and which peaks are valid at inference.

A strategy maps a 1-D tensor of candidate values to one cut-off; a value is valid when it is `>=` the cut-off.

- `fixed`: a constant (PRM's official constants: class logit 0, peak value 30).
- `mean`, `median`: the mean / median of the candidates.
- `quantile`: the q-quantile of the candidates (linear interpolation, `torch.quantile`); `q3` is q = 0.75.

Where it is applied (see `select_classes`, `select_peaks`):

(a) Classes: the candidates are an image's C class scores (logits). Class c is valid when
    `score_c >= strategy(scores)` **and** `sigmoid(score_c) >= min_class_prob`. The probability floor is what lets
    a negative image be empty: a relative rule alone always keeps some class.
(b) Peaks: for each valid class, the candidates are the values of that CRM's peaks (local maxima that already
    passed the peak filter, PRM's median floor). Peak k is valid when `value_k >= strategy(values)`.

An empty candidate set has cut-off +inf, so nothing is valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ranprm.errors import ConfigError

StrategyKind = Literal["fixed", "mean", "median", "quantile"]


@dataclass(frozen=True)
class ThresholdStrategy:
    kind: StrategyKind
    value: float = 0.0  # the cut-off of `fixed`
    q: float = 0.75  # the quantile of `quantile`

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "mean", "median", "quantile"):
            raise ConfigError(f"threshold kind {self.kind!r} is unknown; choose fixed, mean, median or quantile")
        if self.kind == "quantile" and not 0.0 <= self.q <= 1.0:
            raise ConfigError(f"threshold quantile q={self.q} must lie in [0, 1]")

    def cutoff(self, values: Tensor) -> Tensor:
        """The cut-off (a 0-d tensor) for a 1-D tensor of candidate values."""
        values = values.detach().flatten().float()
        if values.numel() == 0:
            return torch.tensor(float("inf"), device=values.device)
        if self.kind == "fixed":
            return torch.tensor(float(self.value), device=values.device)
        if self.kind == "mean":
            return values.mean()
        if self.kind == "median":
            # torch.median returns the lower middle value; the quantile form gives the usual average of the two.
            return torch.quantile(values, 0.5)
        return torch.quantile(values, self.q)

    def valid(self, values: Tensor) -> Tensor:
        """Bool mask of the candidates that reach the cut-off."""
        return values >= self.cutoff(values)


@dataclass(frozen=True)
class Thresholds:
    """The inference selection rule: one strategy for classes, one for peaks, and a class-probability floor."""

    classes: ThresholdStrategy
    peaks: ThresholdStrategy
    min_class_prob: float = 0.0

    @classmethod
    def from_config(cls, cfg: dict) -> Thresholds:
        try:
            return cls(
                classes=ThresholdStrategy(**dict(cfg["classes"])),
                peaks=ThresholdStrategy(**dict(cfg["peaks"])),
                min_class_prob=float(cfg.get("min_class_prob", 0.0)),
            )
        except (KeyError, TypeError) as err:
            raise ConfigError(
                f"threshold config needs classes.kind and peaks.kind (with value/q as needed): {err}"
            ) from err


def select_classes(scores: Tensor, thresholds: Thresholds) -> Tensor:
    """Bool (B, C) of valid classes from class logits (B, C), each image judged against its own scores."""
    if scores.ndim == 1:
        scores = scores.unsqueeze(0)
    valid = torch.stack([thresholds.classes.valid(row) for row in scores])
    return valid & (torch.sigmoid(scores) >= thresholds.min_class_prob)


def select_peaks(values: Tensor, strategy: ThresholdStrategy) -> Tensor:
    """Bool (K,) of valid peaks among one CRM's peak values (K,)."""
    return strategy.valid(values)
