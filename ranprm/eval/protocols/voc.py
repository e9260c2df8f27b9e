"""`eval.protocol=voc`: chainercv's `eval_instance_segmentation_voc`, the protocol of the published image-level tables.

Written to chainercv's definition (`calc_instance_segmentation_voc_prec_rec` + `calc_detection_voc_ap` with
`use_07_metric=False`; IRN, BESTIE and others report with it), vectorised over pixels and thresholds:

- **Masks.** Ground-truth masks exclude void (255) pixels; a predicted mask is scored whole, so its void pixels
  count in the union (chainercv's VOC instance masks are built from instance ids and never contain void).
- **IoU** is the exact ratio of pixel counts rounded to float32, the dtype chainercv stores it in.
- **Matching, per image and class.** The image's predictions of the class are taken by score, high to low; each is
  matched to its argmax-IoU ground-truth instance of that class (the first of equal IoUs, in instance-id order). If
  that IoU is below t, or that instance was already taken by a higher-scored prediction, the prediction is a false
  positive; there is no fallback to the next-best instance (COCO has one). A prediction below t takes nothing.
  A prediction in an image without ground truth of its class is a false positive.
- **Difficult.** chainercv's instance evaluation has no `gt_difficult`: every GT instance counts (VOC's instance
  masks mark difficult regions as void instead).
- **AP, per class:** all predictions of the set ranked by score, precision and recall after each one, and the VOC
  2010+ all-point AP: the area under the monotone precision envelope (`ranprm.eval.functional`). A class with GT and
  no prediction has AP 0; a class without GT has no AP (chainercv: NaN) and is left out of the mean (chainercv's
  `nanmean`).
- **Ties.** Equal scores are ordered by image id, then by their order within the image (a stable sort), the same
  on one process or many. chainercv's `argsort()[::-1]` leaves the order of equal scores to NumPy's unstable sort;
  with distinct scores the two agree exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ranprm.eval.functional import mask_iou, ranking, voc_average_precision
from ranprm.eval.protocols.base import PROTOCOLS, Protocol

IOU_THRESHOLDS: tuple[float, ...] = (0.25, 0.5, 0.75)


def match_image(
    pred_masks: Tensor,
    pred_labels: Tensor,
    pred_scores: Tensor,
    gt_masks: Tensor,
    gt_labels: Tensor,
    thresholds: tuple[float, ...] = IOU_THRESHOLDS,
) -> tuple[Tensor, Tensor, Tensor]:
    """chainercv's matching of one image's predictions to its ground truth.

    pred_masks (N, H, W) bool, pred_labels (N,), pred_scores (N,); gt_masks (M, H, W) bool, gt_labels (M,).
    Returns (labels (N,), scores (N,) float64, true_positive (N, T) bool), predictions grouped by class and ranked
    by score within each class (the order chainercv records them in).
    """
    labels_out, scores_out, matches_out = [], [], []
    scores64 = pred_scores.double()
    for c in torch.unique(pred_labels).tolist():
        rows = (pred_labels == c).nonzero(as_tuple=True)[0]
        rows = rows[ranking(scores64[rows])]
        gt_rows = (gt_labels == c).nonzero(as_tuple=True)[0]
        tp = torch.zeros(len(thresholds), len(rows), dtype=torch.bool)
        if len(gt_rows):
            iou = mask_iou(pred_masks[rows], gt_masks[gt_rows]).float()  # (n, m)
            target = iou.argmax(1)  # the first maximum on ties, as NumPy's argmax
            best = iou.gather(1, target[:, None])[:, 0]
            above = best[None, :] >= torch.tensor(thresholds, dtype=torch.float32)[:, None]  # (T, n)
            # Prediction i takes its target unless a higher-ranked prediction j < i above t took it first.
            same_target = target[:, None] == target[None, :]  # (n, n): [i, j]
            earlier = torch.ones(len(rows), len(rows), dtype=torch.bool).tril(-1)  # j < i
            taken_before = (same_target & earlier)[None] & above[:, None, :]  # (T, i, j)
            tp = above & ~taken_before.any(2)
        labels_out.append(torch.full((len(rows),), c, dtype=torch.long))
        scores_out.append(scores64[rows])
        matches_out.append(tp.T)
    if not labels_out:
        return (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64),
                torch.zeros(0, len(thresholds), dtype=torch.bool))  # fmt: skip
    return torch.cat(labels_out), torch.cat(scores_out), torch.cat(matches_out)


@PROTOCOLS.register("voc")
class VOCProtocol(Protocol):
    ap_keys = (("25", "AP@0.25"), ("50", "AP@0.5"), ("75", "AP@0.75"))
    note = (
        "AP in %: protocol voc (chainercv's eval_instance_segmentation_voc): VOC all-point AP; each prediction "
        "matched to its argmax-IoU GT of its class, a false positive below the IoU threshold or when that GT is "
        "taken; GT masks without void pixels, predicted masks scored whole; mean over classes with GT."
    )

    def scored_predictions(self, masks: Tensor, void: Tensor) -> Tensor:
        return masks

    def image_record(
        self,
        pred_masks: Tensor,
        pred_labels: Tensor,
        pred_scores: Tensor,
        gt_masks: Tensor,
        gt_labels: Tensor,
        gt_iscrowd: Tensor | None = None,
    ) -> Any:
        # No crowd reaches here: the default `scored_ground_truth` made crowd regions void.
        return match_image(pred_masks, pred_labels, pred_scores, gt_masks, gt_labels)

    def class_aps(self, records: list[Any], num_classes: int, gt_per_class: Tensor) -> dict[str, Tensor]:
        aps = torch.full((len(IOU_THRESHOLDS), num_classes), float("nan"), dtype=torch.float64)
        if records:
            labels = torch.cat([r[0] for r in records])
            scores = torch.cat([r[1] for r in records])
            matches = torch.cat([r[2] for r in records])
        else:
            labels, scores = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
            matches = torch.zeros(0, len(IOU_THRESHOLDS), dtype=torch.bool)
        for c in range(num_classes):
            n_gt = int(gt_per_class[c])
            if n_gt == 0:
                continue  # undefined: chainercv's NaN, left out of the mean
            rows = (labels == c).nonzero(as_tuple=True)[0]
            ranked = matches[rows[ranking(scores[rows])]]  # (n, T)
            for t in range(len(IOU_THRESHOLDS)):
                aps[t, c] = voc_average_precision(ranked[:, t], n_gt)
        return {key: aps[t] for t, (key, _) in enumerate(self.ap_keys)}
