"""The `eval` config, parsed once at the edge into `EvalConfig` (train.yaml and evaluate.yaml share these keys)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ranprm.errors import ConfigError

# The evaluators `eval.metrics: null` runs: every metric family ranprm ships (see ranprm/eval/evaluators/).
STANDARD_EVALUATORS: tuple[str, ...] = ("instance_ap", "abo", "pointing", "pointing_game", "classification")


@dataclass(frozen=True)
class EvalConfig:
    """What the evaluators compute, and how.

    protocol:                the instance protocol (`ranprm.eval.protocols`): `voc` (chainercv's, the published
                             tables') or `coco` (COCO-style AP through faster-coco-eval)
    metrics:                 the evaluators to run, by registered name
    pointing_tolerance:      pixels; ranprm's pointing accuracy counts a peak within this distance of a GT instance
    pointing_game_tolerance: pixels; the pointing game's hit tolerance around a GT box (18, after Oquab et al.)
    max_dets_per_image:      `coco` only: COCOeval's cap on detections per image and class
    """

    protocol: str = "voc"
    metrics: tuple[str, ...] = STANDARD_EVALUATORS
    pointing_tolerance: int = 0
    pointing_game_tolerance: float = 18.0
    max_dets_per_image: int = 100

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> EvalConfig:
        """Parse the `eval` mapping of a config (keys the evaluators do not use, such as `max_images`, are left to
        their readers). Missing keys take the defaults, so checkpoints written before a key existed still load."""
        from ranprm.eval.base import EVALUATORS
        from ranprm.eval.protocols import PROTOCOLS

        cfg = dict(cfg or {})
        defaults = cls()
        protocol = str(cfg.get("protocol") or defaults.protocol)
        PROTOCOLS.entry(protocol)  # a one-line ConfigError naming the choices
        metrics_value = cfg.get("metrics")
        if metrics_value is None:
            metrics = defaults.metrics
        elif isinstance(metrics_value, str) or not all(isinstance(m, str) for m in metrics_value):
            raise ConfigError(
                f"eval.metrics={metrics_value!r} must be a list of evaluator names, e.g. [instance_ap,abo]"
            )
        else:
            metrics = tuple(dict.fromkeys(metrics_value))  # in order, each once
        for name in metrics:
            EVALUATORS.entry(name)
        return cls(
            protocol=protocol,
            metrics=metrics,
            pointing_tolerance=_number(cfg, "pointing_tolerance", defaults.pointing_tolerance, int),
            pointing_game_tolerance=_number(cfg, "pointing_game_tolerance", defaults.pointing_game_tolerance, float),
            max_dets_per_image=_number(cfg, "max_dets_per_image", defaults.max_dets_per_image, int, minimum=10),
        )


def _number(cfg: Mapping[str, Any], key: str, default: Any, kind: type, minimum: float = 0) -> Any:
    value = cfg.get(key)
    if value is None:
        return default
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or not math.isfinite(number) or number < minimum or number != value:
        raise ConfigError(f"eval.{key}={value!r} must be a {kind.__name__} >= {minimum:g}")
    return number
