"""Which classes and which peaks are valid at inference: the `threshold` presets.

A preset (`conf/threshold/*.yaml`) names one rule per role and a probability floor:

(a) **classes**: class c of an image is valid when `score_c >= cut-off` **and** `sigmoid(score_c) >=
    min_class_prob`. The scores are the image's class logits at the inference class-score factor
    (`prm.class_sub_pixel_factor`). `class_distribution` says which candidates the rule's cut-off is taken over:
    - `image` (the default): the image's own C class scores, one cut-off per image;
    - `dataset`: class c's scores over a calibration split, one cut-off per class, computed once (the second
      reading of the RAN-PRM paper's "third quartile of the distribution of class aggregations"). The scores are
      collected at the end of training and stored in the checkpoint (`ClassCalibration`); `ranprm-evaluate
      calibration.split=<split>` recomputes them.
    `min_class_prob` is **ranprm's addition**, an explicit key of every preset. A relative rule over an image's
    own scores always keeps some classes (the literal per-image Q3 keeps 5 of 20 VOC classes in every image,
    even an empty one); the floor lets a negative image be empty. PRM's official rule (`fixed`) needs none (0).
(b) **peaks**: for each valid class, the candidates are the values of its CRM's peaks (local maxima that passed
    the peak filter `head.peak_filter`, PRM's median); peak k is valid when `value_k >= cut-off(values)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ranprm.errors import ConfigError
from ranprm.prm.thresholds.base import ThresholdRule, build_rule

CLASS_DISTRIBUTIONS = ("image", "dataset")


@dataclass(frozen=True, eq=False)
class ClassCalibration:
    """Class scores over a calibration split, for `class_distribution: dataset`.

    scores:          (N, C) float, the N calibration images' class logits at the inference class-score factor
    split:           which images they are (e.g. "held-out part of Main/train", "Segmentation/val")
    evaluated_split: True when they are the split that ranprm-evaluate scores by default: thresholds calibrated
                     on the images they are then judged on (recorded beside the metrics, and warned about)
    """

    scores: Tensor
    split: str
    evaluated_split: bool = False

    def __post_init__(self) -> None:
        if self.scores.ndim != 2 or len(self.scores) == 0:
            raise ConfigError(
                f"class calibration ({self.split}) needs (N >= 1, C) scores, got {tuple(self.scores.shape)}"
            )

    def cutoffs(self, rule: ThresholdRule) -> tuple[float, ...]:
        """Per class, the rule's cut-off over that class's scores: (C,)."""
        return tuple(float(v) for v in rule.cutoff(self.scores.float().T))

    def to_dict(self) -> dict[str, Any]:
        """What the checkpoint stores (tensors, strings and bools only: loadable with `weights_only=True`)."""
        scores = self.scores.detach().float().cpu()
        return {"scores": scores, "split": self.split, "evaluated_split": self.evaluated_split}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ClassCalibration:
        scores = torch.as_tensor(record["scores"]).float()
        return cls(scores, str(record["split"]), bool(record.get("evaluated_split", False)))

    def summary(self) -> dict[str, Any]:
        """Where the calibration came from, for metrics.json."""
        return {"split": self.split, "images": len(self.scores), "evaluated_split": self.evaluated_split}


@dataclass(frozen=True)
class Thresholds:
    """The inference selection rule, parsed: one rule per role, the floor, and per-class cut-offs if calibrated."""

    classes: ThresholdRule
    peaks: ThresholdRule
    min_class_prob: float = 0.0
    class_distribution: str = "image"
    class_cutoffs: tuple[float, ...] | None = None  # (C,) for class_distribution=dataset, from a ClassCalibration

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_class_prob <= 1.0:
            raise ConfigError(f"threshold.min_class_prob={self.min_class_prob} must lie in [0, 1]")
        if self.class_distribution not in CLASS_DISTRIBUTIONS:
            raise ConfigError(
                f"threshold.class_distribution={self.class_distribution!r} is unknown; choose image or dataset"
            )

    @property
    def needs_calibration(self) -> bool:
        """True when the class rule is taken over a calibration split that has not been given yet."""
        return self.class_distribution == "dataset" and self.class_cutoffs is None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], calibration: ClassCalibration | None = None) -> Thresholds:
        """From a `threshold` preset; `calibration` supplies the per-class cut-offs of `class_distribution: dataset`."""
        if not isinstance(cfg, Mapping) or "classes" not in cfg or "peaks" not in cfg:
            raise ConfigError(
                "threshold config needs classes and peaks, each {kind: <rule>, <options>} "
                f"(e.g. classes: {{kind: quantile, q: 0.75}}), got {dict(cfg) if isinstance(cfg, Mapping) else cfg!r}"
            )
        known = {"name", "classes", "peaks", "min_class_prob", "class_distribution"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"threshold: unknown option(s) {unknown}; known: {sorted(known)}")
        try:
            floor = float(cfg.get("min_class_prob", 0.0))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"threshold.min_class_prob={cfg.get('min_class_prob')!r} must be a number") from err
        classes = build_rule(cfg["classes"], "threshold.classes")
        distribution = str(cfg.get("class_distribution", "image"))
        cutoffs = None
        if distribution == "dataset" and calibration is not None:
            cutoffs = calibration.cutoffs(classes)
        return cls(classes, build_rule(cfg["peaks"], "threshold.peaks"), floor, distribution, cutoffs)


def select_classes(scores: Tensor, thresholds: Thresholds) -> Tensor:
    """Bool (B, C) of valid classes from class logits (B, C) (a (C,) row is one image)."""
    if scores.ndim == 1:
        scores = scores.unsqueeze(0)
    if thresholds.class_distribution == "dataset":
        if thresholds.class_cutoffs is None:
            raise ConfigError(
                "threshold.class_distribution=dataset needs a class calibration (stored at the end of training); "
                "this model has none: recompute it with ranprm-evaluate calibration.split=<split>"
            )
        if len(thresholds.class_cutoffs) != scores.shape[1]:
            raise ConfigError(
                f"the class calibration has {len(thresholds.class_cutoffs)} classes, the model {scores.shape[1]}"
            )
        cutoff = torch.tensor(thresholds.class_cutoffs, device=scores.device)[None, :]
    else:
        cutoff = thresholds.classes.cutoff(scores)[:, None]
    return thresholds.classes.passes(scores, cutoff) & (torch.sigmoid(scores) >= thresholds.min_class_prob)


def select_peaks(values: Tensor, rule: ThresholdRule) -> Tensor:
    """Bool (K,) of valid peaks among one CRM's peak values (K,)."""
    return rule.valid(values)
