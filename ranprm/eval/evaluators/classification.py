"""`classification`: classification mAP over images (`cls_map`), the number checkpoints and sweeps optimise.

Per class, torchmetrics' `MultilabelAveragePrecision` (non-interpolated AP: the area under the step precision-recall
curve, tied scores grouped), averaged over the classes with at least one positive image. A class without a positive
image has no AP and is left out of the mean; torchmetrics' own "macro" would count it as 0. Without any positive
image the mAP is undefined (None; NaN in the training log). This one definition is `val/cls_map` during training and
`cls_map` in `ranprm-evaluate`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torchmetrics.classification import MultilabelAveragePrecision

from ranprm.eval.base import EVALUATORS, Column, Evaluation, Evaluator, pct, undefined_note
from ranprm.eval.inputs import GroundTruth, Prediction


def classification_map(scores: Tensor, targets: Tensor) -> tuple[float | None, list[float | None]]:
    """Classification mAP over images and the per-class APs (None for a class with no positive image).

    scores:  (B, C) float  logits or probabilities (only the ranking matters)
    targets: (B, C) int/bool, 1 where the image shows the class
    No image, or no positive at all, gives None (undefined).
    """
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"classification_map: scores {tuple(scores.shape)} and targets must both be (B, C)")
    num_classes = scores.shape[1]
    positives = targets.bool().sum(0)
    if scores.shape[0] == 0 or not bool(positives.any()):
        return None, [None] * num_classes
    metric = MultilabelAveragePrecision(num_labels=num_classes, average="none")
    with warnings.catch_warnings():
        # A class with no positive image is excluded below; torchmetrics' warning about it is noise here.
        warnings.filterwarnings("ignore", message="No positive samples found")
        per_class = metric(scores.detach().float().cpu(), targets.detach().long().cpu())
    aps: list[float | None] = [
        float(ap) if n > 0 else None for ap, n in zip(per_class, positives.tolist(), strict=True)
    ]
    defined = [ap for ap in aps if ap is not None]
    return sum(defined) / len(defined), aps


@EVALUATORS.register("classification")
class ClassificationAP(Evaluator):
    def names(self) -> tuple[str, ...]:
        return ("cls_map",)

    def process(self, gt: GroundTruth, pred: Prediction) -> Any:
        if pred.class_scores is None or gt.class_targets is None:
            return None  # e.g. a results file: no class scores
        return pred.class_scores.detach().float().cpu(), gt.class_targets.detach().long().cpu()

    def reduce(self, records: list[Any]) -> Evaluation:
        scored = [r for r in records if r is not None]
        if not scored:
            return Evaluation()
        value, aps = classification_map(torch.stack([s for s, _ in scored]), torch.stack([t for _, t in scored]))
        return Evaluation(
            {"cls_map": value},
            columns=[Column("cls_ap", "cls AP", aps, mean="cls_map")],
            notes=["cls AP: non-interpolated, over images; mean over classes with a positive image."]
            + ([] if value is not None else [undefined_note("cls mAP", "no evaluated image shows any class")]),
            summary=f"cls mAP {pct(value)}",
        )
