"""Known-answer tests of ranprm.eval.metrics on tiny hand-built masks."""

from __future__ import annotations

import math

import pytest
import torch

from ranprm.eval.metrics import (
    GroundTruth,
    InstanceEvaluator,
    Peaks,
    classification_map,
    mask_iou,
    per_class_table,
    scalar_metrics,
    summary,
)
from ranprm.prm.instances import Instances

CLASSES = ("cat", "dog", "cow")
H = W = 32
# COCO 101-point interpolated AP of the ranking TP, FP, TP over 2 GT: precision 1 for recall 0..0.5 (51 recall
# points), then the monotone envelope 2/3 for recall 0.51..1 (50 points).
AP_TP_FP_TP = (51 * 1.0 + 50 * (2 / 3)) / 101


def box(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    """Bool (H, W) mask of rows y0..y1-1, columns x0..x1-1."""
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def preds(masks: list[torch.Tensor], labels: list[int], scores: list[float], peaks=None) -> Instances:
    n = len(labels)
    return Instances(
        image_size=(H, W),
        masks=torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.bool),
        labels=torch.tensor(labels, dtype=torch.long),
        scores=torch.tensor(scores, dtype=torch.float32),
        peaks=torch.tensor(peaks, dtype=torch.float32) if peaks is not None else torch.full((n, 2), math.nan),
        prms=torch.zeros(n, H, W),
    )


def gt(image_id: str, masks: list[torch.Tensor], labels: list[int], void: torch.Tensor | None = None) -> GroundTruth:
    return GroundTruth(
        image_id=image_id,
        masks=torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.bool),
        labels=torch.tensor(labels, dtype=torch.long),
        void=void if void is not None else torch.zeros(H, W, dtype=torch.bool),
    )


def evaluate(pairs: list[tuple[Instances, GroundTruth]], **kwargs) -> dict:
    ev = InstanceEvaluator(CLASSES, **kwargs)
    ev.update([p for p, _ in pairs], [g for _, g in pairs])
    return ev.compute()


def maps(result: dict) -> list[float]:
    return [result["map_r_25"], result["map_r_50"], result["map_r_75"]]


def test_ground_truth_as_predictions_scores_one():
    ring = box(0, 12, 0, 12) & ~box(1, 11, 1, 11)  # void border around the first cat, as VOC draws it
    g0 = gt("a", [box(1, 11, 1, 11), box(20, 30, 2, 9)], [0, 1], void=ring)
    g1 = gt("b", [box(4, 20, 4, 20)], [0])
    result = evaluate([(preds(list(g0.masks), [0, 1], [0.9, 0.3]), g0), (preds(list(g1.masks), [0], [0.5]), g1)])
    assert maps(result) == pytest.approx([1.0, 1.0, 1.0])
    assert result["abo"] == pytest.approx(1.0)
    assert result["per_class"]["cat"] == {"n_gt": 2, "ap_25": 1.0, "ap_50": 1.0, "ap_75": 1.0}
    # cow has no GT: its AP is undefined and it does not drag the mean down.
    assert result["per_class"]["cow"]["ap_50"] is None and result["per_class"]["cow"]["n_gt"] == 0
    assert (result["num_images"], result["num_gt"], result["num_predictions"]) == (2, 3, 3)
    assert "pointing_accuracy" not in result and "cls_map" not in result


def test_known_iou_passes_025_and_05_fails_075():
    target = box(4, 14, 4, 14)  # 100 px
    pred = box(4, 14, 4, 10)  # 60 px inside it: IoU 0.6
    assert mask_iou(target[None], pred[None]).item() == pytest.approx(0.6)
    g = gt("a", [target], [1])
    result = evaluate([(preds([pred], [1], [0.8]), g)])
    assert maps(result) == pytest.approx([1.0, 1.0, 0.0])
    assert result["abo"] == pytest.approx(0.6)


def test_void_pixels_do_not_count():
    target = box(8, 16, 8, 16)  # 64 px
    void = box(4, 20, 4, 20) & ~target  # 192 px ring
    pred = box(4, 20, 4, 20)  # the GT plus the whole void ring: IoU 64/256 = 0.25 if void counted
    with_void = evaluate([(preds([pred], [0], [0.9]), gt("a", [target], [0], void=void))])
    assert maps(with_void) == pytest.approx([1.0, 1.0, 1.0])
    assert with_void["abo"] == pytest.approx(1.0)
    as_uint8 = evaluate([(preds([pred], [0], [0.9]), gt("a", [target], [0], void=void.to(torch.uint8)))])
    assert maps(as_uint8) == pytest.approx([1.0, 1.0, 1.0])
    without_void = evaluate([(preds([pred], [0], [0.9]), gt("a", [target], [0]))])
    assert maps(without_void) == pytest.approx([1.0, 0.0, 0.0])
    assert without_void["abo"] == pytest.approx(0.25)


def test_empty_predictions_give_zeros():
    g = gt("a", [box(0, 8, 0, 8), box(10, 20, 10, 20)], [0, 2])
    result = evaluate([(Instances.empty((H, W)), g)])
    assert maps(result) == [0.0, 0.0, 0.0]
    assert result["abo"] == 0.0
    assert result["per_class"]["cow"] == {"n_gt": 1, "ap_25": 0.0, "ap_50": 0.0, "ap_75": 0.0}
    # Nothing at all (no image, or images without GT) is zeros too, never -1 or a crash.
    assert maps(InstanceEvaluator(CLASSES).compute()) == [0.0, 0.0, 0.0]
    assert maps(evaluate([(Instances.empty((H, W)), gt("b", [], []))])) == [0.0, 0.0, 0.0]


def test_abo_hand_computed():
    a, b, c = box(0, 10, 0, 10), box(20, 30, 0, 8), box(20, 30, 20, 30)  # 100, 80, 100 px
    g = gt("a", [a, b, c], [0, 1, 1])
    p1 = box(0, 10, 0, 5)  # inside a: IoU 50/100
    p2 = box(20, 30, 0, 10)  # covers b: IoU 80/100, and of another class than b: ABO ignores classes
    result = evaluate([(preds([p1, p2], [0, 0], [0.9, 0.8]), g)])
    # c has no overlapping prediction: best IoU 0.
    assert result["abo"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ((0.9, 0.8, 0.7), AP_TP_FP_TP),  # TP, FP, TP
        ((0.9, 0.95, 0.7), 2 / 3),  # FP, TP, TP: precision 0, 1/2, 2/3 -> envelope 2/3 everywhere
        ((0.9, 0.1, 0.7), 1.0),  # TP, TP, FP: the false positive comes after full recall
    ],
)
def test_shuffled_scores_give_known_ap(scores, expected):
    """2 GT cats in images a and b, 3 predictions ranked across images; the false positive sits in image c,
    which has no GT at all, so this also checks that such an image's false positives are counted."""
    ga, gb, gc = gt("a", [box(0, 10, 0, 10)], [0]), gt("b", [box(5, 15, 5, 15)], [0]), gt("c", [], [])
    pairs = [
        (preds([box(0, 10, 0, 10)], [0], [scores[0]]), ga),
        (preds([box(20, 30, 20, 30)], [0], [scores[1]]), gc),
        (preds([box(5, 15, 5, 15)], [0], [scores[2]]), gb),
    ]
    result = evaluate(pairs)
    assert maps(result) == pytest.approx([expected] * 3)
    assert result["per_class"]["cat"]["ap_50"] == pytest.approx(expected)


def test_false_positive_of_another_class_only_hurts_that_class():
    g = gt("a", [box(0, 10, 0, 10)], [0])
    result = evaluate([(preds([box(0, 10, 0, 10), box(0, 10, 0, 10)], [0, 1], [0.5, 0.9]), g)])
    # dog has no GT: undefined, excluded; the mean is cat's perfect AP.
    assert maps(result) == pytest.approx([1.0, 1.0, 1.0])
    assert result["per_class"]["dog"]["ap_25"] is None


def test_pointing_hand_example():
    a, b, c = box(0, 10, 0, 10), box(20, 30, 20, 30), box(20, 30, 0, 10)
    g = gt("a", [a, b, c], [0, 1, 0])
    peaks = Peaks(
        yx=torch.tensor([[5.0, 5.0], [5.0, 5.0], [25.0, 25.0], [15.0, 15.0], [9.4, 2.0], [9.6, 2.0]]),
        labels=torch.tensor([0, 1, 1, 0, 0, 0]),
    )
    # hit (a), wrong class, hit (b), background, rounds to row 9 (hit a), rounds to row 10 (miss)
    ev = InstanceEvaluator(CLASSES)
    ev.update([Instances.empty((H, W))], [g], peaks=[peaks])
    result = ev.compute()
    assert result["pointing_accuracy"] == pytest.approx(3 / 6)
    assert result["pointing_recall"] == pytest.approx(2 / 3)  # a and b pointed at, c not
    assert result["num_peaks"] == 6


def test_pointing_from_instance_peaks_and_tolerance():
    g = gt("a", [box(0, 10, 0, 10)], [0])
    # seeding peaks: one inside, one 2 px right of the box (column 11; the box ends at column 9)
    p = preds([box(0, 10, 0, 10), box(0, 10, 0, 12)], [0, 0], [0.9, 0.8], peaks=[[5.0, 5.0], [5.0, 11.0]])
    assert evaluate([(p, g)])["pointing_accuracy"] == pytest.approx(0.5)
    assert evaluate([(p, g)], pointing_tolerance=1)["pointing_accuracy"] == pytest.approx(0.5)
    assert evaluate([(p, g)], pointing_tolerance=2)["pointing_accuracy"] == pytest.approx(1.0)


def test_classification_map_hand_example():
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.7, 0.1], [0.1, 0.6, 0.3]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    # cat: ranked P (p 1, r 1/2), N, P (p 2/3, r 1) -> 1/2 * 1 + 1/2 * 2/3 = 5/6;
    # dog: both positives first -> 1; cow: no positive image -> undefined, left out of the mean.
    cls_map, per_class = classification_map(scores, targets)
    assert per_class[0] == pytest.approx(5 / 6) and per_class[1] == pytest.approx(1.0) and per_class[2] is None
    assert cls_map == pytest.approx((5 / 6 + 1.0) / 2)
    ev = InstanceEvaluator(CLASSES)
    gts = [gt(str(i), [], []) for i in range(3)]
    # accumulated over two batches
    ev.update([Instances.empty((H, W))] * 2, gts[:2], class_scores=scores[:2], class_targets=targets[:2])
    ev.update([Instances.empty((H, W))], gts[2:], class_scores=scores[2:], class_targets=targets[2:])
    result = ev.compute()
    assert result["cls_map"] == pytest.approx((5 / 6 + 1.0) / 2)
    assert result["per_class"]["cat"]["cls_ap"] == pytest.approx(5 / 6)


def test_table_and_summary():
    g = gt("a", [box(4, 14, 4, 14)], [1])
    result = evaluate([(preds([box(4, 14, 4, 10)], [1], [0.8]), g)])
    table = per_class_table(result)
    lines = table.splitlines()
    assert lines[0].startswith("| class | GT | AP@0.25")
    assert "| dog | 1 | 100.0 | 100.0 | 0.0 |" in lines
    assert "| cat | 0 | – | – | – |" in lines
    assert "| **mean** | 1 | 100.0 | 100.0 | 0.0 |" in lines
    line = summary(result)
    assert "\n" not in line and "100.0 / 100.0 / 0.0" in line and "ABO 60.0" in line
    scalars = scalar_metrics(result)
    assert scalars["map_r_50"] == 1.0 and "per_class" not in scalars


def test_mismatched_inputs_raise():
    g = gt("a", [box(0, 4, 0, 4)], [0])
    ev = InstanceEvaluator(CLASSES)
    with pytest.raises(ValueError, match="label outside"):
        ev.update([preds([box(0, 4, 0, 4)], [3], [0.5])], [g])
    small = Instances.empty((8, 8))
    with pytest.raises(ValueError, match="predicted masks"):
        ev.update([small], [g])
