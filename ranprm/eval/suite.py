"""The evaluators a run uses (`eval.metrics`), run together, and their merged result.

`EvaluatorSuite` is itself an evaluator set with the same `reset / update / compute / names`; `SuiteResult` is
what `metrics.json`, `per_class.md`, the logs and the sweep summary are written from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ranprm.eval.base import EVALUATORS, Evaluation, Evaluator
from ranprm.eval.config import EvalConfig
from ranprm.eval.inputs import GroundTruth, Prediction


@dataclass
class SuiteResult:
    """The merged `Evaluation`s of a suite, with the protocol that made the instance numbers."""

    protocol: str
    class_names: tuple[str, ...]
    evaluations: list[Evaluation] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        """Every metric computed, in evaluator order: what is logged (`val/<name>`) and summarised."""
        return {k: v for e in self.evaluations for k, v in e.metrics.items()}

    @property
    def counts(self) -> dict[str, int]:
        return {k: v for e in self.evaluations for k, v in e.counts.items()}

    def merged(self, other: SuiteResult) -> SuiteResult:
        """This result followed by `other`'s evaluations (the training module adds its every-epoch `cls_map`)."""
        return SuiteResult(self.protocol, self.class_names, [*self.evaluations, *other.evaluations])

    def to_record(self) -> dict[str, Any]:
        """The `metrics.json` form: protocol, metrics and counts at the top level, the names of the metrics, and
        `per_class: {class: {column: value}}` (None where undefined)."""
        per_class: dict[str, dict[str, Any]] = {name: {} for name in self.class_names}
        for evaluation in self.evaluations:
            for column in evaluation.columns:
                for name, value in zip(self.class_names, column.values, strict=True):
                    per_class[name][column.key] = value
        metrics = self.metrics
        return {"protocol": self.protocol, **metrics, **self.counts, "metric_names": list(metrics),
                "per_class": per_class}  # fmt: skip


class EvaluatorSuite:
    """The evaluators named in `cfg.metrics` (or `only`), fed the same images."""

    def __init__(self, class_names: Sequence[str], cfg: EvalConfig | None = None,
                 only: Sequence[str] | None = None) -> None:  # fmt: skip
        self.cfg = cfg or EvalConfig()
        self.class_names = tuple(class_names)
        self.metric_families: tuple[str, ...] = self.cfg.metrics if only is None else tuple(only)
        self.evaluators: list[Evaluator] = [
            EVALUATORS.get(name)(self.class_names, self.cfg) for name in self.metric_families
        ]

    def names(self) -> tuple[str, ...]:
        return tuple(n for e in self.evaluators for n in e.names())

    def reset(self) -> None:
        for evaluator in self.evaluators:
            evaluator.reset()

    def update(self, gts: Sequence[GroundTruth], preds: Sequence[Prediction]) -> None:
        for evaluator in self.evaluators:
            evaluator.update(gts, preds)

    def image_records(self) -> dict[str, list[tuple[str, Any]]]:
        """{evaluator name: its `(image_id, record)` pairs} (`Evaluator.image_records`): what `ranprm-evaluate
        records=true` saves for bootstraps over images (no masks, only matches, overlaps and scores)."""
        return {name: e.image_records() for name, e in zip(self.metric_families, self.evaluators, strict=True)}

    def compute(self) -> SuiteResult:
        return SuiteResult(self.cfg.protocol, self.class_names, [e.compute() for e in self.evaluators])
