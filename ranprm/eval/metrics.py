"""Evaluation of predicted instances against VOC-style ground truth: mAP^r, ABO, pointing, classification mAP.

Pure: torch, numpy and torchmetrics only (no Lightning, no Hydra). Conventions, after docs/method.md "Evaluation
conventions":

- **Void.** VOC's 255 pixels are removed from every predicted and every ground-truth mask before any IoU, so a
  prediction is neither rewarded nor punished on object borders and difficult regions. A GT instance with no
  pixel left after that cannot be matched by anything; it is dropped (VOC never has one).
- **mAP^r at IoU t** (t = 0.25, 0.5, 0.75): torchmetrics `MeanAveragePrecision(iou_type="segm")` on the
  faster_coco_eval backend, so the AP is **COCO-style 101-point interpolated AP** (precision made monotone,
  then read at recall 0, 0.01, ..., 1), area range "all", at most `max_dets_per_image` (100) detections per
  image and class, a detection matches a GT when IoU >= t. Instances are ranked by score over the whole set,
  per class. One COCOeval run gives the precision array for all three thresholds and every class
  (`extended_summary`), from which each threshold's AP and each class's AP are read; torchmetrics' own
  `class_metrics` is not used because it re-runs COCOeval once per class and only reports the mean over
  thresholds. mAP is the mean over classes **that have at least one GT instance**; classes without GT are
  excluded (their AP is undefined, reported as None). No prediction at all gives AP 0.0 for every class with
  GT.
- **ABO**: for every GT instance, the best IoU with any predicted instance of any class in its image (0 when
  the image has none), averaged over all GT instances of the set.
- **Pointing**: a peak (y, x) in image pixels is rounded to the nearest pixel, `floor(v + 0.5)` (integer
  coordinates are pixel centres, as with align_corners=True upsampling), and clamped into the image. A peak of
  class c is a hit when that pixel (or, with `pointing_tolerance` r > 0, any pixel within Euclidean distance
  r) lies in a GT instance of class c (void excluded). Pointing accuracy = hits / peaks; pointing recall =
  share of GT instances containing at least one peak of their class.
- **Classification mAP**: torchmetrics `MultilabelAveragePrecision` per class (non-interpolated AP, the area
  under the step precision-recall curve), averaged over classes with at least one positive image.
  torchmetrics' own "macro" would count a class with no positive as AP 0; it is computed per class and
  averaged here instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics.classification import MultilabelAveragePrecision
from torchmetrics.detection import MeanAveragePrecision

from ranprm.prm.instances import Instances

IOU_THRESHOLDS: tuple[float, ...] = (0.25, 0.5, 0.75)
THRESHOLD_KEYS: tuple[str, ...] = ("25", "50", "75")  # suffixes of map_r_<k> and ap_<k>
# Exactly COCO's recall grid; i / 100 avoids float drift so recall 0.5 is met by a recall of exactly 1/2.
_REC_THRESHOLDS = [i / 100 for i in range(101)]


@dataclass
class GroundTruth:
    """Ground-truth instances of one image at its original size.

    image_id: str           the image stem, as in the split file and in results files
    masks:    (M, H, W) bool instance masks
    labels:   (M,) long      0-based class index in the dataset's class order
    void:     (H, W) bool    VOC's 255 pixels, ignored in every IoU
    """

    image_id: str
    masks: Tensor
    labels: Tensor
    void: Tensor

    def __post_init__(self) -> None:
        if self.masks.ndim != 3 or self.void.shape != self.masks.shape[1:]:
            raise ValueError(
                f"GroundTruth {self.image_id}: masks {tuple(self.masks.shape)} must be (M, H, W) and void "
                f"{tuple(self.void.shape)} (H, W)"
            )
        if self.labels.shape != (self.masks.shape[0],):
            raise ValueError(f"GroundTruth {self.image_id}: labels {tuple(self.labels.shape)} do not match masks")

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.void.shape[0]), int(self.void.shape[1])


@dataclass
class Peaks:
    """Peaks of one image used for pointing, when they are not just the instances' seeding peaks.

    yx:     (P, 2) float  (y, x) in image pixels
    labels: (P,) long     0-based class of the CRM each peak came from
    """

    yx: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.yx.shape != (len(self.labels), 2):
            raise ValueError(f"Peaks: yx {tuple(self.yx.shape)} must be (P, 2) with P = len(labels)")


def classification_map(scores: Tensor, targets: Tensor) -> tuple[float, list[float | None]]:
    """Classification mAP over images and the per-class APs (None for a class with no positive image).

    scores:  (B, C) float  logits or probabilities (only the ranking matters)
    targets: (B, C) int/bool, 1 where the image shows the class
    """
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"classification_map: scores {tuple(scores.shape)} and targets must both be (B, C)")
    num_classes = scores.shape[1]
    positives = targets.bool().sum(0)
    if scores.shape[0] == 0 or not bool(positives.any()):
        return 0.0, [None] * num_classes
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


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix (M, N) of boolean masks a (M, H, W) and b (N, H, W); 0 where the union is empty."""
    fa, fb = a.flatten(1).float(), b.flatten(1).float()
    # Counts stay exact in float32 up to 2^24 pixels per mask, far above any VOC image.
    inter = fa @ fb.T
    union = fa.sum(1, keepdim=True) + fb.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def _peak_pixels(yx: Tensor, size: tuple[int, int]) -> Tensor:
    """Long (P, 2) pixel indices of (y, x) peaks: nearest pixel, clamped into the image."""
    h, w = size
    pix = torch.floor(yx.double() + 0.5).long()
    return torch.stack([pix[:, 0].clamp(0, h - 1), pix[:, 1].clamp(0, w - 1)], dim=1)


def _peak_hits(masks: Tensor, pixels: Tensor, radius: int) -> Tensor:
    """Bool (P, M): peak p lies in (or within `radius` px of) mask m.  masks (M, H, W), pixels (P, 2)."""
    if radius <= 0:
        return masks[:, pixels[:, 0], pixels[:, 1]].T
    h, w = masks.shape[1:]
    offs = torch.arange(-radius, radius + 1)
    dy, dx = torch.meshgrid(offs, offs, indexing="ij")
    disk = dy**2 + dx**2 <= radius**2
    dy, dx = dy[disk], dx[disk]  # (K,) offsets of the disk
    ys = pixels[:, :1] + dy  # (P, K)
    xs = pixels[:, 1:] + dx
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    vals = masks[:, ys.clamp(0, h - 1), xs.clamp(0, w - 1)] & inside  # (M, P, K)
    return vals.any(-1).T


class InstanceEvaluator:
    """Accumulates predictions and ground truth image by image; `compute()` gives every metric of the set.

    Memory: torchmetrics keeps the mAP state as COCO RLE (on CPU); ABO and pointing are reduced to counts at
    each `update`, so no mask outlives its batch.
    """

    def __init__(
        self, class_names: Sequence[str], *, max_dets_per_image: int = 100, pointing_tolerance: int = 0
    ) -> None:
        if max_dets_per_image < 10:
            raise ValueError(f"max_dets_per_image={max_dets_per_image}: COCOeval needs at least 10")
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.max_dets_per_image = int(max_dets_per_image)
        self.pointing_tolerance = int(pointing_tolerance)
        self.reset()

    def reset(self) -> None:
        self._map = MeanAveragePrecision(
            iou_type="segm",
            iou_thresholds=list(IOU_THRESHOLDS),
            rec_thresholds=_REC_THRESHOLDS,
            max_detection_thresholds=[1, 10, self.max_dets_per_image],
            extended_summary=True,
            backend="faster_coco_eval",
        )
        self._num_images = 0
        self._num_preds = 0
        self._gt_per_class = torch.zeros(self.num_classes, dtype=torch.long)
        self._best_iou_sum = 0.0
        self._pointing_seen = False
        self._num_peaks = 0
        self._peak_hits = 0
        self._gt_pointed = 0
        self._cls_scores: list[Tensor] = []
        self._cls_targets: list[Tensor] = []

    def update(
        self,
        preds: Sequence[Instances],
        gts: Sequence[GroundTruth],
        *,
        peaks: Sequence[Peaks] | None = None,
        class_scores: Tensor | None = None,
        class_targets: Tensor | None = None,
    ) -> None:
        """Add a batch of images.

        preds:         one `Instances` per image (masks at the image's original size, labels 0-based)
        gts:           one `GroundTruth` per image, same order
        peaks:         one `Peaks` per image for pointing; None takes each instance's seeding peak (finite
                       rows of `Instances.peaks`), so peaks that seeded no instance are not counted then
        class_scores:  (B, C) image-level scores for classification mAP, with class_targets (B, C) 0/1
        """
        if len(preds) != len(gts) or (peaks is not None and len(peaks) != len(gts)):
            raise ValueError(f"update: {len(preds)} predictions and {len(gts)} ground truths must pair up")
        if (class_scores is None) != (class_targets is None):
            raise ValueError("update: class_scores and class_targets go together")
        for i, (pred, gt) in enumerate(zip(preds, gts, strict=True)):
            self._update_image(pred, gt, None if peaks is None else peaks[i], peaks is not None)
        if class_scores is not None and class_targets is not None:
            if class_scores.shape != (len(gts), self.num_classes) or class_targets.shape != class_scores.shape:
                raise ValueError(f"update: class_scores/targets must be ({len(gts)}, {self.num_classes})")
            self._cls_scores.append(class_scores.detach().float().cpu())
            self._cls_targets.append(class_targets.detach().long().cpu())

    def _update_image(self, pred: Instances, gt: GroundTruth, peaks: Peaks | None, peaks_given: bool) -> None:
        size = gt.image_size
        if tuple(pred.masks.shape[1:]) != size:
            raise ValueError(
                f"image {gt.image_id}: predicted masks are {tuple(pred.masks.shape[1:])}, ground truth {size}"
            )
        for what, labels in (("predicted", pred.labels), ("ground-truth", gt.labels)):
            if len(labels) and not (int(labels.min()) >= 0 and int(labels.max()) < self.num_classes):
                raise ValueError(f"image {gt.image_id}: {what} label outside 0..{self.num_classes - 1}")
        keep = ~gt.void.cpu().bool()  # a uint8 void would turn `~` into a bitwise not
        gt_masks = gt.masks.cpu().bool() & keep
        nonempty = gt_masks.flatten(1).any(1)
        gt_masks, gt_labels = gt_masks[nonempty], gt.labels.cpu().long()[nonempty]
        pred_masks = pred.masks.cpu().bool() & keep
        pred_labels, pred_scores = pred.labels.cpu().long(), pred.scores.detach().cpu().double()
        if not bool(torch.isfinite(pred_scores).all()):
            raise ValueError(f"image {gt.image_id}: predicted scores must be finite to be ranked")

        self._num_images += 1
        self._num_preds += len(pred_labels)
        self._gt_per_class += torch.bincount(gt_labels, minlength=self.num_classes)

        # ABO: best overlap per GT over all predictions of any class.
        if len(gt_masks) and len(pred_masks):
            self._best_iou_sum += float(mask_iou(gt_masks, pred_masks).max(1).values.double().sum())

        self._update_map(pred_masks, pred_labels, pred_scores, gt_masks, gt_labels)
        self._update_pointing(pred, peaks, peaks_given, gt_masks, gt_labels, size)

    def _update_map(
        self,
        pred_masks: Tensor,
        pred_labels: Tensor,
        pred_scores: Tensor,
        gt_masks: Tensor,
        gt_labels: Tensor,
    ) -> None:
        target = {"masks": gt_masks, "labels": gt_labels, "iscrowd": torch.zeros_like(gt_labels)}
        if not len(gt_labels) and len(pred_labels):
            # torchmetrics leaves an image with no GT mask out of the COCO ground truth, and COCOeval only
            # scores images listed there, so false positives on such an image would vanish. One empty crowd
            # region of a class id past the real ones keeps the image listed; being crowd, it is never a GT to
            # find, and its class is not among the ones averaged.
            target = {
                "masks": torch.zeros(1, *gt_masks.shape[1:], dtype=torch.bool),
                "labels": torch.tensor([self.num_classes]),
                "iscrowd": torch.ones(1, dtype=torch.long),
            }
        self._map.update(
            [{"masks": pred_masks, "labels": pred_labels, "scores": pred_scores}],
            [target],
        )

    def _update_pointing(
        self,
        pred: Instances,
        peaks: Peaks | None,
        peaks_given: bool,
        gt_masks: Tensor,
        gt_labels: Tensor,
        size: tuple[int, int],
    ) -> None:
        if peaks is None:
            yx, labels = pred.peaks.detach().cpu(), pred.labels.cpu().long()
        else:
            yx, labels = peaks.yx.detach().cpu(), peaks.labels.cpu().long()
        finite = torch.isfinite(yx).all(1) if len(yx) else torch.zeros(0, dtype=torch.bool)
        yx, labels = yx[finite], labels[finite]
        if not (peaks_given or len(labels)):
            return  # no peak information for this image (e.g. a results file without `peak`)
        self._pointing_seen = True
        self._num_peaks += len(labels)
        if not len(labels) or not len(gt_labels):
            return
        hits = _peak_hits(gt_masks, _peak_pixels(yx, size), self.pointing_tolerance)  # (P, M)
        hits &= labels[:, None] == gt_labels[None, :]
        self._peak_hits += int(hits.any(1).sum())
        self._gt_pointed += int(hits.any(0).sum())

    def compute(self) -> dict[str, Any]:
        """Every metric of the set, fractions in [0, 1].

        Keys: map_r_25, map_r_50, map_r_75, abo, num_images, num_gt, num_predictions; pointing_accuracy,
        pointing_recall, num_peaks when peaks were seen; cls_map when class scores were given; per_class:
        {name: {n_gt, ap_25, ap_50, ap_75[, cls_ap]}}, None where a class has no GT (or no positive image).
        """
        num_gt = int(self._gt_per_class.sum())
        aps = self._per_class_ap()  # (T, C), NaN where undefined
        has_gt = self._gt_per_class > 0
        out: dict[str, Any] = {}
        for t, key in enumerate(THRESHOLD_KEYS):
            out[f"map_r_{key}"] = float(aps[t, has_gt].mean()) if bool(has_gt.any()) else 0.0
        out["abo"] = self._best_iou_sum / num_gt if num_gt else 0.0
        if self._pointing_seen:
            out["pointing_accuracy"] = self._peak_hits / self._num_peaks if self._num_peaks else 0.0
            out["pointing_recall"] = self._gt_pointed / num_gt if num_gt else 0.0
            out["num_peaks"] = self._num_peaks
        cls_aps: list[float | None] | None = None
        if self._cls_scores:
            out["cls_map"], cls_aps = classification_map(torch.cat(self._cls_scores), torch.cat(self._cls_targets))
        out["num_images"] = self._num_images
        out["num_gt"] = num_gt
        out["num_predictions"] = self._num_preds
        per_class: dict[str, dict[str, Any]] = {}
        for c, name in enumerate(self.class_names):
            row: dict[str, Any] = {"n_gt": int(self._gt_per_class[c])}
            for t, key in enumerate(THRESHOLD_KEYS):
                row[f"ap_{key}"] = None if math.isnan(aps[t, c]) else float(aps[t, c])
            if cls_aps is not None:
                row["cls_ap"] = cls_aps[c]
            per_class[name] = row
        out["per_class"] = per_class
        return out

    def _per_class_ap(self) -> Tensor:
        """AP (T, C) float64 at each IoU threshold for each class; NaN for a class with no GT."""
        aps = torch.full((len(IOU_THRESHOLDS), self.num_classes), float("nan"), dtype=torch.float64)
        aps[:, self._gt_per_class > 0] = 0.0  # stays 0 where COCOeval scored no detection of the class
        if self._num_preds == 0:
            # torchmetrics returns -1 and no precision array when there is no detection at all.
            return aps
        result = self._map.compute()
        # precision: (T, R, K, A, M); area index 0 is "all", the last max-dets entry is max_dets_per_image.
        # K runs over the sorted class ids seen in predictions or GT, which is `classes`.
        precision = result["precision"][:, :, :, 0, -1].double()
        for k, class_id in enumerate(result["classes"].reshape(-1).tolist()):
            if class_id >= self.num_classes or self._gt_per_class[class_id] == 0:
                continue  # the crowd placeholder, or a class predicted but absent from the GT: undefined
            curve = precision[:, :, k]  # (T, R); -1 only if COCOeval saw no image of the class
            aps[:, class_id] = torch.where(curve[:, 0] > -1, curve.clamp_min(0).mean(1), 0.0)
        return aps


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The top-level numbers of `InstanceEvaluator.compute()` (for loggers that take scalars only)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def per_class_table(metrics: dict[str, Any]) -> str:
    """Markdown table of per-class AP (%) at each IoU threshold, with the mean row; "–" where undefined."""
    per_class: dict[str, dict[str, Any]] = metrics["per_class"]
    with_cls = any("cls_ap" in row for row in per_class.values())
    head = ["class", "GT", "AP@0.25", "AP@0.5", "AP@0.75"] + (["cls AP"] if with_cls else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, row in per_class.items():
        cells = [name, str(row["n_gt"])] + [_pct(row[f"ap_{k}"]) for k in THRESHOLD_KEYS]
        if with_cls:
            cells.append(_pct(row.get("cls_ap")))
        lines.append("| " + " | ".join(cells) + " |")
    mean = ["**mean**", str(metrics["num_gt"])] + [_pct(metrics[f"map_r_{k}"]) for k in THRESHOLD_KEYS]
    if with_cls:
        mean.append(_pct(metrics.get("cls_map")))
    lines.append("| " + " | ".join(mean) + " |")
    note = (
        "AP in %: COCO 101-point interpolated, area all, void pixels excluded; mean over classes with GT; "
        "cls AP: non-interpolated, over images."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


def summary(metrics: dict[str, Any]) -> str:
    """One line: mAP^r at the three thresholds, ABO, pointing and classification mAP where present (in %)."""
    maps = " / ".join(_pct(metrics[f"map_r_{k}"]) for k in THRESHOLD_KEYS)
    parts = [f"mAP^r@0.25/0.5/0.75 {maps}", f"ABO {_pct(metrics['abo'])}"]
    if "pointing_accuracy" in metrics:
        parts.append(f"pointing acc {_pct(metrics['pointing_accuracy'])} recall {_pct(metrics['pointing_recall'])}")
    if "cls_map" in metrics:
        parts.append(f"cls mAP {_pct(metrics['cls_map'])}")
    counts = f"({metrics['num_images']} images, {metrics['num_gt']} GT, {metrics['num_predictions']} predictions)"
    return " | ".join(parts) + " " + counts
