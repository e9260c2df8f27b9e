"""The two protocols on seeded random sets: `voc` against a naive reference written from chainercv's definition,
`coco` against the numbers ranprm reported before `voc` existed (they must not move)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ranprm.eval import EvalConfig, EvaluatorSuite, GroundTruth, InstanceMasks, Prediction
from ranprm.prm.instances import Instances
from tests.eval_cases import Case, random_cases

CLASSES = ("a", "b", "c")


def _record(cases: list[Case], protocol: str) -> dict:
    suite = EvaluatorSuite(CLASSES, EvalConfig(protocol=protocol, metrics=("instance_ap", "abo")))
    for c in cases:
        n, size = len(c.pred_labels), tuple(c.void.shape)
        inst = Instances(size, c.pred_masks, c.pred_labels, c.pred_scores, torch.full((n, 2), math.nan),
                         torch.zeros(n, *size))  # fmt: skip
        suite.update([GroundTruth(c.image_id, size, InstanceMasks(c.gt_masks, c.gt_labels, c.void))],
                     [Prediction(instances=inst)])  # fmt: skip
    return suite.compute().to_record()


def _reference_voc_ap(cases: list[Case], num_classes: int, t: float) -> list[float]:
    """chainercv's eval_instance_segmentation_voc restated with plain loops: per image and class, predictions by
    score, each to its argmax-IoU GT (void removed from GT only); below t or GT taken: FP; all-point AP."""
    records: dict[int, list[tuple[float, bool]]] = {c: [] for c in range(num_classes)}
    n_pos = [0] * num_classes
    for case in cases:
        gt_masks = (case.gt_masks & ~case.void).numpy()
        gt_labels, pred_masks = case.gt_labels.numpy(), case.pred_masks.numpy()
        pred_labels, pred_scores = case.pred_labels.numpy(), case.pred_scores.numpy()
        for c in range(num_classes):
            n_pos[c] += int((gt_labels == c).sum())
            gts = [m for m, label in zip(gt_masks, gt_labels, strict=True) if label == c]
            mine = sorted((i for i in range(len(pred_labels)) if pred_labels[i] == c), key=lambda i: -pred_scores[i])
            taken = [False] * len(gts)
            for i in mine:
                ious = [np.float32((pred_masks[i] & g).sum() / (pred_masks[i] | g).sum()) for g in gts]
                if not ious:
                    records[c].append((pred_scores[i], False))
                    continue
                j = int(np.argmax(ious))
                hit = bool(ious[j] >= t) and not taken[j]
                if ious[j] >= t:
                    taken[j] = True
                records[c].append((pred_scores[i], hit))
    aps = []
    for c in range(num_classes):
        if n_pos[c] == 0:
            aps.append(math.nan)
            continue
        ranked = sorted(records[c], key=lambda r: -r[0])
        tp = np.cumsum([hit for _, hit in ranked])
        fp = np.cumsum([not hit for _, hit in ranked])
        rec = np.concatenate([[0.0], tp / n_pos[c], [1.0]])
        prec = np.concatenate([[0.0], tp / np.maximum(tp + fp, 1), [0.0]])
        for k in range(len(prec) - 2, -1, -1):
            prec[k] = max(prec[k], prec[k + 1])
        aps.append(float(sum((rec[k + 1] - rec[k]) * prec[k + 1] for k in range(len(rec) - 1) if rec[k + 1] != rec[k])))
    return aps


@pytest.mark.parametrize("seed", range(6))
def test_voc_equals_a_naive_reference_of_chainercv(seed):
    cases = random_cases(seed, num_images=4 + seed, size=(18 + seed, 16 + seed))
    record = _record(cases, "voc")
    for t, key in ((0.25, "25"), (0.5, "50"), (0.75, "75")):
        reference = _reference_voc_ap(cases, len(CLASSES), t)
        ours = [record["per_class"][name][f"ap_{key}"] for name in CLASSES]
        for mine, ref in zip(ours, reference, strict=True):
            assert (mine is None and math.isnan(ref)) or mine == pytest.approx(ref, abs=1e-12)
        assert record[f"map_r_{key}"] == pytest.approx(float(np.nanmean(reference)), abs=1e-12)


# What ranprm's COCO path (`ranprm.eval.metrics.InstanceEvaluator` at commit e9fca80) reported for these sets:
# mAP^r at 0.25 / 0.5 / 0.75, ABO, and the per-class AP at 0.5.
COCO_BEFORE = {
    1: ([0.42200220022002205, 0.42200220022002205, 0.42200220022002205, 0.6779718031485875],
        [0.5462046204620462, 0.46732673267326735, 0.2524752475247525]),
    2: ([0.3625962596259626, 0.3625962596259626, 0.2525852585258525, 0.6151652216911316],
        [0.27722772277227714, 0.19999999999999998, 0.6105610561056105]),
    3: ([0.5003300330033004, 0.5003300330033004, 0.4673267326732673, 0.7005084794946015],
        [0.504950495049505, 0.5346534653465347, 0.4613861386138614]),
}  # fmt: skip


@pytest.mark.parametrize("seed", sorted(COCO_BEFORE))
def test_coco_numbers_did_not_move(seed):
    record = _record(random_cases(seed, num_images=10), "coco")
    (map25, map50, map75, abo), per_class_50 = COCO_BEFORE[seed]
    assert [record["map_r_25"], record["map_r_50"], record["map_r_75"]] == [map25, map50, map75]  # bit for bit
    assert [record["per_class"][n]["ap_50"] for n in CLASSES] == per_class_50
    # ABO's IoUs are now exact float64 ratios; before they were float32 quotients: equal to 1e-8.
    assert record["abo"] == pytest.approx(abo, abs=1e-8)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_protocols_differ_on_these_sets(seed):
    """The random sets include void spills and duplicates: voc scores them lower than coco at IoU 0.75 and in ABO.
    (Elsewhere either can be higher: all-point AP is not 101-point AP.)"""
    cases = random_cases(seed, num_images=10)
    voc, coco = _record(cases, "voc"), _record(cases, "coco")
    assert voc["map_r_75"] < coco["map_r_75"] - 0.01
    assert voc["abo"] < coco["abo"] - 0.005
