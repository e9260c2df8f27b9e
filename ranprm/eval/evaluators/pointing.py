"""`pointing`: ranprm's own pointing accuracy and recall of the peaks. **Not** PRM's published pointing figure
(VOC 85.5, COCO 57.5), which is the pointing game's mAP: see `pointing_game`.

- A peak (y, x) in image pixels is rounded to the nearest pixel, `floor(v + 0.5)` (integer coordinates are pixel
  centres, as with align_corners=True upsampling), and clamped into the image.
- A peak of class c is a hit when that pixel (or, with `eval.pointing_tolerance` r > 0, any pixel within Euclidean
  distance r) lies in a GT instance of class c, void excluded.
- `pointing_accuracy` = hits / peaks; `pointing_recall` = share of GT instances holding at least one peak of their
  class. The peaks are every valid peak when a model ran, the instances' seeding peaks for a results file (images
  whose entries carry no `peak` are not scored); without any peak information the metrics are left out. With no
  peak at all, the accuracy is undefined (None); with no GT instance, the recall.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ranprm.eval.base import EVALUATORS, Evaluation, Evaluator, pct, undefined_note
from ranprm.eval.inputs import GroundTruth, Prediction


def peak_pixels(yx: Tensor, size: tuple[int, int]) -> Tensor:
    """Long (P, 2) pixel indices of (y, x) peaks: nearest pixel, clamped into the image."""
    h, w = size
    pix = torch.floor(yx.double() + 0.5).long()
    return torch.stack([pix[:, 0].clamp(0, h - 1), pix[:, 1].clamp(0, w - 1)], dim=1)


def peak_hits(masks: Tensor, pixels: Tensor, radius: int) -> Tensor:
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


@EVALUATORS.register("pointing")
class PointingAccuracy(Evaluator):
    def names(self) -> tuple[str, ...]:
        return ("pointing_accuracy", "pointing_recall")

    def process(self, gt: GroundTruth, pred: Prediction) -> Any:
        """(peaks, hits, GT instances pointed at, GT instances, whether the image had peak information)."""
        if gt.instances is None:
            return None
        gt_masks, gt_labels = gt.scored_instances
        if pred.peaks_yx is None or pred.peak_labels is None:
            return 0, 0, 0, len(gt_labels), False
        yx, labels = pred.peaks_yx.detach().cpu(), pred.peak_labels.cpu().long()
        finite = torch.isfinite(yx).all(1) if len(yx) else torch.zeros(0, dtype=torch.bool)
        yx, labels = yx[finite], labels[finite]
        if not len(labels) or not len(gt_labels):
            return len(labels), 0, 0, len(gt_labels), True
        hits = peak_hits(gt_masks, peak_pixels(yx, gt.image_size), self.cfg.pointing_tolerance)  # (P, M)
        hits &= labels[:, None] == gt_labels[None, :]
        return len(labels), int(hits.any(1).sum()), int(hits.any(0).sum()), len(gt_labels), True

    def reduce(self, records: list[Any]) -> Evaluation:
        scored = [r for r in records if r is not None]
        if not any(r[4] for r in scored):
            return Evaluation()  # no peak information anywhere (a results file without `peak`)
        peaks, hits, pointed, num_gt = (sum(r[i] for r in scored) for i in range(4))
        metrics = {
            "pointing_accuracy": hits / peaks if peaks else None,
            "pointing_recall": pointed / num_gt if num_gt else None,
        }
        notes = []
        if not peaks:
            notes.append(undefined_note("pointing accuracy", "no peak was found"))
        if not num_gt:
            notes.append(undefined_note("pointing recall", "no ground-truth instance"))
        summary = f"pointing acc (ours) {pct(metrics['pointing_accuracy'])} recall {pct(metrics['pointing_recall'])}"
        return Evaluation(metrics, {"num_peaks": peaks}, notes=notes, summary=summary)
