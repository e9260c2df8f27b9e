"""`eval.protocol=coco`: COCO-style mask AP through torchmetrics' `MeanAveragePrecision` on faster-coco-eval.

ranprm's protocol before `voc` existed, kept number for number (tests/test_eval_protocols.py holds its values):

- **Masks.** VOC's void (255) pixels are removed from every predicted and every ground-truth mask before any IoU, so
  a prediction is neither rewarded nor punished on object borders and difficult regions.
- **Crowd** (COCO's `iscrowd` regions, `data=coco`): COCOeval's rule, not void. A crowd region is a ground truth
  that is never missed; a detection whose best match is a crowd region of its class (IoU = intersection over the
  detection's area) is ignored, neither true nor false positive. On COCO-format data the AP at 0.5, 0.75 and
  0.5:0.95 equal COCOeval's `segm` stats on the same JSON and results file (tests/test_coco.py).
- **Matching** is COCOeval's: detections by score, each takes the best still-free GT above the threshold (a
  duplicate falls back to its next-best GT, unlike VOC), at most `eval.max_dets_per_image` detections per image and
  class, area range "all".
- **AP** is COCO's 101-point interpolated AP (precision made monotone, then read at recall 0, 0.01, ..., 1), at IoU
  0.25, 0.5 and 0.75, and the COCO AP averaged over IoU 0.5:0.05:0.95 (`map_r_50_95`). One COCOeval run gives the
  precision array for every threshold and class (`extended_summary`); each threshold is matched independently, so
  adding 0.5:0.95 leaves the other numbers as they were. A class without GT has no AP and is left out of the mean.
- Equal scores: COCOeval's stable sort, in image-id order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from ranprm.eval.inputs import GroundTruth
from ranprm.eval.protocols.base import PROTOCOLS, Protocol
from ranprm.eval.results_io import decode_rle, encode_mask

# 0.25, then COCO's 0.5:0.05:0.95 written out (no float drift: 0.75 is exactly 0.75).
IOU_THRESHOLDS: tuple[float, ...] = (0.25, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
COCO_RANGE = IOU_THRESHOLDS[1:]  # 0.5:0.95
_SINGLE = {"25": 0.25, "50": 0.5, "75": 0.75}  # the AP keys read at one threshold
# Exactly COCO's recall grid; i / 100 avoids float drift so recall 0.5 is met by a recall of exactly 1/2.
_REC_THRESHOLDS = [i / 100 for i in range(101)]


def _masks(rles: list[dict[str, Any]], size: tuple[int, int]) -> Tensor:
    if not rles:
        return torch.zeros(0, *size, dtype=torch.bool)
    return torch.stack([decode_rle(r) for r in rles])


@PROTOCOLS.register("coco")
class COCOProtocol(Protocol):
    ap_keys = (("25", "AP@0.25"), ("50", "AP@0.5"), ("75", "AP@0.75"), ("50_95", "AP@.5:.95"))
    note = (
        "AP in %: protocol coco: COCO 101-point interpolated AP (faster-coco-eval), greedy matching with fallback to "
        "the next-best GT, area all, void pixels removed from predictions and GT; mean over classes with GT."
    )

    def scored_ground_truth(self, gt: GroundTruth) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every instance, crowd regions included and flagged, without the void pixels; instances left without a
        pixel are dropped (VOC and COCO never have one)."""
        assert gt.instances is not None
        void = gt.instances.void.cpu().bool()
        masks = gt.instances.masks.cpu().bool() & ~void
        keep = masks.flatten(1).any(1)
        return masks[keep], gt.instances.labels.cpu().long()[keep], gt.iscrowd[keep], void

    def scored_predictions(self, masks: Tensor, void: Tensor) -> Tensor:
        return masks & ~void

    def image_record(
        self,
        pred_masks: Tensor,
        pred_labels: Tensor,
        pred_scores: Tensor,
        gt_masks: Tensor,
        gt_labels: Tensor,
        gt_iscrowd: Tensor | None = None,
    ) -> Any:
        # RLE keeps a VOC split's worth of masks in memory until `class_aps` (torchmetrics stores RLE too).
        return {
            "size": tuple(gt_masks.shape[1:]) if len(gt_masks) else tuple(pred_masks.shape[1:]),
            "pred": [encode_mask(m) for m in pred_masks],
            "pred_labels": pred_labels.long(),
            "pred_scores": pred_scores.double(),
            "gt": [encode_mask(m) for m in gt_masks],
            "gt_labels": gt_labels.long(),
            "gt_crowd": torch.zeros_like(gt_labels, dtype=torch.bool) if gt_iscrowd is None else gt_iscrowd.bool(),
        }

    def class_aps(self, records: list[Any], num_classes: int, gt_per_class: Tensor) -> dict[str, Tensor]:
        aps = torch.full((len(IOU_THRESHOLDS), num_classes), float("nan"), dtype=torch.float64)
        aps[:, gt_per_class > 0] = 0.0  # stays 0 where COCOeval scored no detection of the class
        if sum(len(r["pred_labels"]) for r in records):
            self._coco_precision(records, num_classes, gt_per_class, aps)
        out = {key: aps[IOU_THRESHOLDS.index(t)] for key, t in _SINGLE.items()}
        out["50_95"] = aps[[IOU_THRESHOLDS.index(t) for t in COCO_RANGE]].mean(0)
        return out

    def _coco_precision(self, records: list[Any], num_classes: int, gt_per_class: Tensor, aps: Tensor) -> None:
        metric = MeanAveragePrecision(
            iou_type="segm",
            iou_thresholds=list(IOU_THRESHOLDS),
            rec_thresholds=_REC_THRESHOLDS,
            max_detection_thresholds=[1, 10, self.cfg.max_dets_per_image],
            extended_summary=True,
            backend="faster_coco_eval",
        )
        for r in records:
            size = r["size"]
            gt_labels = r["gt_labels"]
            crowd = r.get("gt_crowd", torch.zeros_like(gt_labels, dtype=torch.bool)).long()
            target = {"masks": _masks(r["gt"], size), "labels": gt_labels, "iscrowd": crowd}
            if not len(gt_labels) and len(r["pred_labels"]):
                # torchmetrics leaves an image with no GT mask out of the COCO ground truth, and COCOeval only
                # scores images listed there, so false positives on such an image would vanish. One empty crowd
                # region of a class id past the real ones keeps the image listed; being crowd, it is never a GT to
                # find, and its class is not among the ones averaged.
                target = {
                    "masks": torch.zeros(1, *size, dtype=torch.bool),
                    "labels": torch.tensor([num_classes]),
                    "iscrowd": torch.ones(1, dtype=torch.long),
                }
            preds = {"masks": _masks(r["pred"], size), "labels": r["pred_labels"], "scores": r["pred_scores"]}
            metric.update([preds], [target])
        result = metric.compute()
        # precision: (T, R, K, A, M); area index 0 is "all", the last max-dets entry is max_dets_per_image.
        # K runs over the sorted class ids seen in predictions or GT, which is `classes`.
        precision = result["precision"][:, :, :, 0, -1].double()
        for k, class_id in enumerate(result["classes"].reshape(-1).tolist()):
            if class_id >= num_classes or gt_per_class[class_id] == 0:
                continue  # the crowd placeholder, or a class predicted but absent from the GT: undefined
            curve = precision[:, :, k]  # (T, R); -1 only if COCOeval saw no image of the class
            aps[:, class_id] = torch.where(curve[:, 0] > -1, curve.clamp_min(0).mean(1), 0.0)
