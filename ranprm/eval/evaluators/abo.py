"""`abo`: average best overlap, as PRM reports it beside mAP^r.

For every ground-truth instance of the set, the best IoU with any predicted mask of its image, of any class (0 when
the image has none), averaged over all GT instances (0.0 for a set without any). The masks follow `eval.protocol`'s
void rule: GT without void pixels; predictions whole under `voc`, without void under `coco`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ranprm.eval.base import EVALUATORS, Evaluation, Evaluator, pct
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
        if gt.instances is None:
            return None
        masks, _, crowd, void = self.protocol.scored_ground_truth(gt)
        gt_masks = masks[~crowd]  # a crowd region is not an object to overlap
        if pred.instances is None or not len(pred.instances) or not len(gt_masks):
            return torch.zeros(len(gt_masks), dtype=torch.float64)
        pred_masks = self.protocol.scored_predictions(pred.instances.masks.detach().cpu().bool(), void)
        return mask_iou(gt_masks, pred_masks).max(1).values

    def reduce(self, records: list[Any]) -> Evaluation:
        best = [r for r in records if r is not None]
        if not best:
            return Evaluation()
        overlaps = torch.cat(best)
        abo = float(overlaps.mean()) if len(overlaps) else 0.0
        return Evaluation({"abo": abo}, {"num_gt": len(overlaps)}, summary=f"ABO {pct(abo)}")
