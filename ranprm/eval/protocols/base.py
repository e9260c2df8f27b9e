"""The protocol interface: what differs between instance-segmentation protocols, and nothing else.

A protocol decides (1) which ground truth it scores against (`scored_ground_truth`: by default VOC's rule, where
COCO's crowd regions are void like VOC's 255 pixels), (2) which pixels of a predicted mask count
(`scored_predictions`: the void rule), (3) how one image's predictions are matched to its ground truth
(`image_record`, kept per image without masks where the protocol allows it) and (4) how the set's records become
per-class AP at each of its IoU thresholds (`class_aps`). Ground truth always loses its void pixels.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import Tensor

from ranprm.eval.config import EvalConfig
from ranprm.eval.inputs import GroundTruth
from ranprm.utils.registry import Registry


class Protocol(abc.ABC):
    """How one protocol scores instance masks. `ap_keys`: (key, table title) per AP the protocol reports; the
    metrics are `map_r_<key>` and the per-class columns `ap_<key>`."""

    ap_keys: ClassVar[tuple[tuple[str, str], ...]]
    note: ClassVar[str]  # one line for per_class.md: what the AP numbers are

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg

    def scored_ground_truth(self, gt: GroundTruth) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(masks (M, H, W) bool, labels (M,), iscrowd (M,) bool, void (H, W) bool) of an image with instances, as
        this protocol scores them. VOC's rule: crowd regions are void, so no instance is a crowd
        (`GroundTruth.scored_instances`)."""
        masks, labels = gt.scored_instances
        return masks, labels, torch.zeros(len(labels), dtype=torch.bool), gt.void

    @abc.abstractmethod
    def scored_predictions(self, masks: Tensor, void: Tensor) -> Tensor:
        """Predicted masks (N, H, W) bool as this protocol scores them against an image whose void is (H, W)."""

    @abc.abstractmethod
    def image_record(
        self,
        pred_masks: Tensor,
        pred_labels: Tensor,
        pred_scores: Tensor,
        gt_masks: Tensor,
        gt_labels: Tensor,
        gt_iscrowd: Tensor | None = None,
    ) -> Any:
        """One image's record. pred_masks as `scored_predictions` returned them; gt_masks, gt_labels and gt_iscrowd
        as `scored_ground_truth` returned them (None: no crowd)."""

    @abc.abstractmethod
    def class_aps(self, records: list[Any], num_classes: int, gt_per_class: Tensor) -> dict[str, Tensor]:
        """{key: (C,) float64 AP per class} for each of `ap_keys`; NaN for a class with no GT instance."""


PROTOCOLS: Registry[type[Protocol]] = Registry("evaluation protocol", "eval.protocol")
