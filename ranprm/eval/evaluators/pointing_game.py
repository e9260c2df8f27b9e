"""`pointing_game`: the point-based localisation mAP PRM reports (VOC 2012 85.5, COCO 2014 57.5).

PRM (Zhou et al., CVPR 2018) reports "pointwise localization" with the metric of Oquab et al. (CVPR 2015, "Is
object localization for free?"), which WILDCAT (Durand et al., CVPR 2017) and SPN (Zhu et al., ICCV 2017) use too:

- **Point.** For each image and class, the location of the maximum of the class response map (the centre of the
  CRM cell that holds it, in original-image pixels; `ranprm.eval.inputs.class_map_maxima`).
- **Hit.** The point lies within `eval.pointing_game_tolerance` pixels (default 18, Oquab et al.'s tolerance) of a
  ground-truth box of that class: `x0 - tol <= x <= x1 + tol` and the same for y, with the VOC box converted to
  0-based inclusive pixel indices.
- **AP per class.** Every evaluated image is ranked by its score for the class (the class logit). A true positive
  is an image that holds the class with a hit; a false positive is an image that holds the class with a miss, or an
  image without the class (a negative: Oquab et al. count the network's confident "this class is here" on it as a
  wrong localisation). The positives are the images holding the class. AP is VOC's all-point AP
  (`ranprm.eval.functional.voc_average_precision`); the mAP is the mean over classes with at least one positive
  image (undefined, None, for a set without any).
- **Difficult objects** count as objects: an image whose only objects of the class are "difficult" is a positive,
  and a point in a difficult box is a hit. This follows the public SPN code by PRM's authors (SPN.pytorch,
  `experiment/util.py: pointing`, whose positives are the images with label >= 0, difficult included, and whose
  boxes include difficult ones); VOC's classification protocol would ignore such images instead.

Official evaluation code for the mAP version was not found: SPN.pytorch's `pointing` computes a per-class accuracy
(hits / positive images, 15 px tolerance), not an AP over a ranking; PRM's repository ships no localisation code.
The images are those evaluated (VOC: Segmentation val), which is not the classification val split PRM used.
"""

from __future__ import annotations

from typing import Any

import torch

from ranprm.eval.base import EVALUATORS, Column, Evaluation, Evaluator, pct, undefined_note
from ranprm.eval.functional import ranking, voc_average_precision
from ranprm.eval.inputs import GroundTruth, Prediction


@EVALUATORS.register("pointing_game")
class PointingGame(Evaluator):
    def names(self) -> tuple[str, ...]:
        return ("pointing_map",)

    def process(self, gt: GroundTruth, pred: Prediction) -> Any:
        """(scores (C,) float64, positive (C,) bool, hit (C,) bool); None without boxes or class scores."""
        if gt.boxes is None or pred.class_scores is None or pred.class_max_yx is None:
            return None
        tol = self.cfg.pointing_game_tolerance
        y, x = pred.class_max_yx[:, 0].double(), pred.class_max_yx[:, 1].double()  # (C,)
        x0, y0, x1, y1 = gt.boxes.xyxy.double().unbind(1)  # (K,) each; NaN where an object had no box
        inside = (
            (x[:, None] >= x0 - tol) & (x[:, None] <= x1 + tol) & (y[:, None] >= y0 - tol) & (y[:, None] <= y1 + tol)
        )  # (C, K)
        of_class = gt.boxes.labels[None, :] == torch.arange(self.num_classes)[:, None]  # (C, K)
        return pred.class_scores.detach().cpu().double(), of_class.any(1), (inside & of_class).any(1)

    def reduce(self, records: list[Any]) -> Evaluation:
        scored = [r for r in records if r is not None]
        if not scored:
            return Evaluation()  # no class scores or no boxes (e.g. a results file)
        scores = torch.stack([r[0] for r in scored])  # (N, C)
        positive = torch.stack([r[1] for r in scored])
        hit = torch.stack([r[2] for r in scored])
        aps: list[float | None] = []
        for c in range(self.num_classes):
            n_pos = int(positive[:, c].sum())
            if n_pos == 0:
                aps.append(None)
                continue
            order = ranking(scores[:, c])
            aps.append(voc_average_precision((positive[:, c] & hit[:, c])[order], n_pos))
        defined = [a for a in aps if a is not None]
        value = sum(defined) / len(defined) if defined else None
        tol = self.cfg.pointing_game_tolerance
        note = (
            f"pointing AP: PRM's pointing game (Oquab et al. 2015): images ranked by class score, a hit when the "
            f"class map's maximum lies within {tol:g} px of a GT box of the class; VOC all-point AP; mean over "
            "classes present."
        )
        return Evaluation(
            {"pointing_map": value},
            columns=[Column("pointing_ap", "pointing AP", aps, mean="pointing_map")],
            notes=[note] if defined else [note, undefined_note("pointing mAP", "no evaluated image holds an object")],
            summary=f"pointing mAP {pct(value)}",
        )
