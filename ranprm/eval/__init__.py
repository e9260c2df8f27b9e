"""Evaluation: instance mAP^r, ABO, pointing and classification mAP (`metrics`), and COCO results files
(`results_io`). Pure: no Lightning, no Hydra."""

from ranprm.eval.metrics import (
    IOU_THRESHOLDS,
    GroundTruth,
    InstanceEvaluator,
    Peaks,
    classification_map,
    mask_iou,
    per_class_table,
    scalar_metrics,
    summary,
)
from ranprm.eval.results_io import (
    ImageResults,
    decode_rle,
    encode_mask,
    instances_to_results,
    read_results,
    write_results,
)

__all__ = [
    "IOU_THRESHOLDS",
    "GroundTruth",
    "ImageResults",
    "InstanceEvaluator",
    "Peaks",
    "classification_map",
    "decode_rle",
    "encode_mask",
    "instances_to_results",
    "mask_iou",
    "per_class_table",
    "read_results",
    "scalar_metrics",
    "summary",
    "write_results",
]
