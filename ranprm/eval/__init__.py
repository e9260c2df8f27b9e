"""Evaluation: one evaluator per metric family (`reset / update / compute / names`, registered in `EVALUATORS`),
instance protocols (`voc`, `coco`), the inputs they read, reports, and COCO results files. Pure: no Lightning, no
Hydra.

- `base`: the `Evaluator` interface and registry; `evaluators/`: one file per metric (instance_ap, abo, pointing,
  pointing_game, classification); `protocols/`: one file per protocol;
- `inputs`: `GroundTruth` / `Prediction`, built in one place (`eval_inputs`, `ground_truth`, ...);
- `config`: `EvalConfig`; `suite`: the configured evaluators together; `report`: per_class.md and the summary line;
- `results_io`: COCO-style results files.
"""

from ranprm.eval import evaluators as _evaluators  # noqa: F401  (fills EVALUATORS)
from ranprm.eval.base import EVALUATORS, Column, Evaluation, Evaluator
from ranprm.eval.config import STANDARD_EVALUATORS, EvalConfig
from ranprm.eval.evaluators.classification import classification_map
from ranprm.eval.functional import mask_iou, voc_average_precision
from ranprm.eval.inputs import (
    Boxes,
    GroundTruth,
    InstanceMasks,
    Prediction,
    eval_inputs,
    ground_truth,
    prediction_from_instances,
    prediction_from_model,
)
from ranprm.eval.protocols import PROTOCOLS
from ranprm.eval.report import per_class_table, summary
from ranprm.eval.results_io import (
    ImageResults,
    ResultIds,
    decode_rle,
    encode_mask,
    instances_to_results,
    read_results,
    write_results,
)
from ranprm.eval.suite import EvaluatorSuite, SuiteResult

__all__ = [
    "EVALUATORS",
    "PROTOCOLS",
    "STANDARD_EVALUATORS",
    "Boxes",
    "Column",
    "EvalConfig",
    "Evaluation",
    "Evaluator",
    "EvaluatorSuite",
    "GroundTruth",
    "ImageResults",
    "InstanceMasks",
    "Prediction",
    "ResultIds",
    "SuiteResult",
    "classification_map",
    "decode_rle",
    "encode_mask",
    "eval_inputs",
    "ground_truth",
    "instances_to_results",
    "mask_iou",
    "per_class_table",
    "prediction_from_instances",
    "prediction_from_model",
    "read_results",
    "summary",
    "voc_average_precision",
    "write_results",
]
