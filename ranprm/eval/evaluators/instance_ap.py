"""`instance_ap`: mAP^r, the mask AP of instance segmentation, at the IoU thresholds of `eval.protocol`.

The protocol (`ranprm.eval.protocols`) decides the void rule, the matching and the AP; this evaluator counts the
ground truth and averages: mAP^r at IoU t (`map_r_25`, `map_r_50`, `map_r_75`, and `map_r_50_95` under `coco`) is
the mean of the per-class APs over classes with at least one GT instance (a class without GT has no AP: "–" in
per_class.md, null in metrics.json, as chainercv's NaN), and undefined (None) for a set without any GT instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ranprm.eval.base import EVALUATORS, Column, Evaluation, Evaluator, pct, undefined_note
from ranprm.eval.config import EvalConfig
from ranprm.eval.inputs import GroundTruth, Prediction
from ranprm.eval.protocols import PROTOCOLS
from ranprm.prm.instances import Instances


@EVALUATORS.register("instance_ap")
class InstanceAP(Evaluator):
    def __init__(self, class_names: Sequence[str], cfg: EvalConfig | None = None) -> None:
        cfg = cfg or EvalConfig()
        self.protocol = PROTOCOLS.get(cfg.protocol)(cfg)
        super().__init__(class_names, cfg)

    def names(self) -> tuple[str, ...]:
        return tuple(f"map_r_{key}" for key, _ in self.protocol.ap_keys)

    def process(self, gt: GroundTruth, pred: Prediction) -> Any:
        if gt.instances is None:
            return None  # no segmentation for this image: nothing to score
        gt_masks, gt_labels, gt_crowd, void = self.protocol.scored_ground_truth(gt)
        inst = pred.instances if pred.instances is not None else Instances.empty(gt.image_size)
        pred_masks = self.protocol.scored_predictions(inst.masks.detach().cpu().bool(), void)
        record = self.protocol.image_record(
            pred_masks, inst.labels.cpu().long(), inst.scores.detach().cpu().double(), gt_masks, gt_labels, gt_crowd
        )
        # A crowd region is never a GT instance to find (COCO's rule): it does not count.
        return torch.bincount(gt_labels[~gt_crowd], minlength=self.num_classes), len(inst), record

    def reduce(self, records: list[Any]) -> Evaluation:
        scored = [r for r in records if r is not None]
        if not scored:
            return Evaluation()  # no image with instance masks: nothing was scored
        gt_per_class = torch.zeros(self.num_classes, dtype=torch.long)
        for counts, _, _ in scored:
            gt_per_class += counts
        aps = self.protocol.class_aps([r[2] for r in scored], self.num_classes, gt_per_class)
        has_gt = gt_per_class > 0
        metrics: dict[str, float | None] = {}
        columns = [Column("n_gt", "GT", gt_per_class.tolist(), mean="num_gt", percent=False)]
        for key, title in self.protocol.ap_keys:
            name = f"map_r_{key}"
            metrics[name] = float(aps[key][has_gt].mean()) if bool(has_gt.any()) else None
            values = [None if not bool(has_gt[c]) else float(aps[key][c]) for c in range(self.num_classes)]
            columns.append(Column(f"ap_{key}", title, values, mean=name))
        counts = {
            "num_images": len(scored),
            "num_gt": int(gt_per_class.sum()),
            "num_predictions": sum(n for _, n, _ in scored),
        }
        thresholds = "/".join(title.removeprefix("AP@") for _, title in self.protocol.ap_keys)
        summary = f"mAP^r@{thresholds} " + " / ".join(pct(metrics[n]) for n in self.names())
        notes = [self.protocol.note]
        if not bool(has_gt.any()):
            notes.append(undefined_note("mAP^r", f"no ground-truth instance in the {len(scored)} scored image(s)"))
            summary += " (no GT instance)"
        return Evaluation(metrics, counts, columns, notes, summary)
