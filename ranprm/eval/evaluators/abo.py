"""`abo`: average best overlap, as PRM reports it beside mAP^r.

For every ground-truth instance of the set, the best IoU with any predicted mask of its image, of any class (0 when
the image has none), averaged over all GT instances; undefined (None) for a set without any. The masks follow
`eval.protocol`'s void rule: GT without void pixels; predictions whole under `voc`, without void under `coco`. COCO's
crowd regions are not instances to overlap (void under `voc`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ranprm.eval.base import EVALUATORS, Evaluation, Evaluator, pct, undefined_note
from ranprm.eval.config import EvalConfig
from ranprm.eval.functional import mask_iou
from ranprm.eval.inputs import GroundTruth, Prediction
from ranprm.eval.protocols import PROTOCOLS


@EVALUATORS.register("abo")
class AverageBestOverlap(Evaluator):
    def __init__(self, class_names: Sequence[str], cfg: EvalConfig | None = None) -> None:
        cfg = cfg or EvalConfig()
        self.protocol = PROTOCOLS.get(cfg.protocol)(cfg)
        super().__init__(class_names, cfg)

    def names(self) -> tuple[str, ...]:
        return ("abo",)

    def process(self, gt: GroundTruth, pred: Prediction) -> Any:
        """(best IoU (M,) float64, class (M,) long) per GT instance; the class lets a study restrict ABO to some
        (image, class) pairs."""
        if gt.instances is None:
            return None
        masks, labels, crowd, void = self.protocol.scored_ground_truth(gt)
        gt_masks, gt_labels = masks[~crowd], labels[~crowd].cpu().long()  # a crowd region is not an object to overlap
        if pred.instances is None or not len(pred.instances) or not len(gt_masks):
            return torch.zeros(len(gt_masks), dtype=torch.float64), gt_labels
        pred_masks = self.protocol.scored_predictions(pred.instances.masks.detach().cpu().bool(), void)
        return mask_iou(gt_masks, pred_masks).max(1).values, gt_labels

    def reduce(self, records: list[Any]) -> Evaluation:
        best = [r[0] for r in records if r is not None]
        if not best:
            return Evaluation()
        overlaps = torch.cat(best)
        if not len(overlaps):
            note = undefined_note("ABO", f"no ground-truth instance in the {len(best)} scored image(s)")
            return Evaluation({"abo": None}, {"num_gt": 0}, notes=[note], summary="ABO – (no GT instance)")
        abo = float(overlaps.mean())
        return Evaluation({"abo": abo}, {"num_gt": len(overlaps)}, summary=f"ABO {pct(abo)}")
