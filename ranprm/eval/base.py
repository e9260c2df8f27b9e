"""The evaluator interface: `reset / update / compute / names`, one evaluator per metric family, registered by name.

A new metric is one new file in `ranprm/eval/evaluators/` (or in a `RANPRM_PLUGINS` module):

    @EVALUATORS.register("my_metric")
    class MyMetric(Evaluator):
        def names(self): return ("my_metric",)
        def process(self, gt, pred): ...        # one image -> a small picklable record (None: nothing to score)
        def reduce(self, records): ...          # every image's record -> Evaluation

and `eval.metrics=[...,my_metric]` runs it: the training log, W&B, `metrics.json`, `ranprm-evaluate` and the sweep
summary take its names from `names()`.

**Distributed evaluation.** `update` keeps one record per image, keyed by its id, and never a mask. `compute`
gathers every process's records (`torch.distributed.all_gather_object`, when a process group with more than one
process is running; every process must call it, as Lightning's epoch-end hooks do), keeps one record per image id
(a `DistributedSampler` pads the last batch with repeated images) and sorts them by image id before reducing, so the
result is the same on every process and equal to one process's result on all the images, whatever the split.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from ranprm.eval.config import EvalConfig
from ranprm.eval.inputs import GroundTruth, Prediction, check_pair
from ranprm.utils.registry import Registry


@dataclass
class Column:
    """One per-class column of `per_class.md` and of `metrics.json`'s `per_class`.

    key:     the field name in `per_class[<class>]`
    title:   the table header
    values:  one value per class (None where undefined)
    mean:    the metric or count shown in the table's mean row (None: blank)
    percent: values are fractions shown in %; False: counts shown as they are
    """

    key: str
    title: str
    values: list[float | int | None]
    mean: str | None = None
    percent: bool = True


@dataclass
class Evaluation:
    """What one evaluator computed.

    metrics: {name: value} for names from `names()`; a name is left out when its inputs were never given (e.g.
             pointing without peaks): these are logged, written to metrics.json and summarised. None: undefined on
             this set (e.g. mAP^r with no ground-truth instance at all), not 0.0: null in metrics.json, "–" in
             tables, NaN in the training log; the evaluator adds a note saying why (`undefined_note`)
    counts:  integers behind the metrics (images, GT instances, predictions, ...): metrics.json only
    columns: per-class columns
    notes:   one line each for the per_class.md note (what the numbers are)
    summary: a short human-readable part of the one-line summary
    """

    metrics: dict[str, float | None] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    columns: list[Column] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: str = ""


class Evaluator(abc.ABC):
    """One metric family over a set of images. Subclasses implement `names`, `process` and `reduce`."""

    def __init__(self, class_names: Sequence[str], cfg: EvalConfig | None = None) -> None:
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.cfg = cfg or EvalConfig()
        self.reset()

    @abc.abstractmethod
    def names(self) -> tuple[str, ...]:
        """The metric keys `compute()` can produce (logged as `val/<name>`, written to metrics.json)."""

    @abc.abstractmethod
    def process(self, gt: GroundTruth, pred: Prediction) -> Any:
        """One image's record: small and picklable (no masks kept); None when there is nothing to score."""

    @abc.abstractmethod
    def reduce(self, records: list[Any]) -> Evaluation:
        """The metrics of a set from its images' records, in image-id order (None records included)."""

    def reset(self) -> None:
        self._records: list[tuple[str, Any]] = []

    def update(self, gts: Sequence[GroundTruth], preds: Sequence[Prediction]) -> None:
        """Add images: one `GroundTruth` and one `Prediction` each, in the same order."""
        if len(gts) != len(preds):
            raise ValueError(f"update: {len(preds)} predictions and {len(gts)} ground truths must pair up")
        for gt, pred in zip(gts, preds, strict=True):
            check_pair(gt, pred, self.num_classes)
            self._records.append((gt.image_id, self.process(gt, pred)))

    def image_records(self) -> list[tuple[str, Any]]:
        """Every image's `(image_id, record)` since `reset`, gathered and sorted as `compute` reduces them: resampling
        them and calling `reduce` gives a bootstrap over images with this evaluator's own definition."""
        return gather_records(self._records)

    def compute(self) -> Evaluation:
        """The metrics over every image seen since `reset`, on every process alike (see the module docstring)."""
        return self.reduce([record for _, record in self.image_records()])


def gather_records(records: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Every process's `(image_id, record)` pairs, one per image id (the first seen), sorted by image id."""
    everything = records
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, records)
        everything = [pair for part in parts for pair in part]
    unique: dict[str, Any] = {}
    for image_id, record in everything:
        unique.setdefault(image_id, record)
    return sorted(unique.items(), key=lambda pair: pair[0])


def pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal, "–" when undefined (tables and summaries)."""
    return "–" if value is None else f"{100 * value:.1f}"


def undefined_note(names: str, reason: str) -> str:
    """The per_class.md / summary note for metrics left undefined (None) on this set, and why."""
    return f"{names}: undefined (– here, null in metrics.json), {reason}."


EVALUATORS: Registry[type[Evaluator]] = Registry("evaluator", "eval.metrics")
