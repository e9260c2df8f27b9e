"""Known-answer tests of the evaluators on tiny hand-built masks, under both protocols (`voc` and `coco`).

Every expected number is worked out by hand in the comment beside it.
"""

from __future__ import annotations

import math

import pytest
import torch

from ranprm.errors import ConfigError
from ranprm.eval import (
    EVALUATORS,
    Boxes,
    EvalConfig,
    EvaluatorSuite,
    GroundTruth,
    InstanceMasks,
    Prediction,
    classification_map,
    mask_iou,
    per_class_table,
    summary,
    voc_average_precision,
)
from ranprm.prm.instances import Instances

CLASSES = ("cat", "dog", "cow")
H = W = 32
# The ranking TP, FP, TP over 2 GT: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
# VOC all-point: the envelope is 1 up to recall 1/2, then 2/3: 1/2 * 1 + 1/2 * 2/3 = 5/6.
VOC_TP_FP_TP = 5 / 6
# COCO 101-point: precision 1 at recall 0..0.5 (51 points), the envelope 2/3 at recall 0.51..1 (50 points).
COCO_TP_FP_TP = (51 * 1.0 + 50 * (2 / 3)) / 101


def box(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    """Bool (H, W) mask of rows y0..y1-1, columns x0..x1-1."""
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def preds(masks: list[torch.Tensor], labels: list[int], scores: list[float], peaks=None) -> Prediction:
    n = len(labels)
    inst = Instances(
        image_size=(H, W),
        masks=torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.bool),
        labels=torch.tensor(labels, dtype=torch.long),
        scores=torch.tensor(scores, dtype=torch.float64),
        peaks=torch.tensor(peaks, dtype=torch.float32) if peaks is not None else torch.full((n, 2), math.nan),
        prms=torch.zeros(n, H, W),
    )
    return Prediction(instances=inst)


def gt(image_id: str, masks: list[torch.Tensor], labels: list[int], void: torch.Tensor | None = None) -> GroundTruth:
    return GroundTruth(
        image_id,
        (H, W),
        InstanceMasks(
            masks=torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.bool),
            labels=torch.tensor(labels, dtype=torch.long),
            void=void if void is not None else torch.zeros(H, W, dtype=torch.bool),
        ),
    )


def evaluate(pairs: list[tuple[Prediction, GroundTruth]], protocol: str = "voc", metrics=("instance_ap", "abo"),
             **cfg) -> dict:  # fmt: skip
    suite = EvaluatorSuite(CLASSES, EvalConfig(protocol=protocol, metrics=tuple(metrics), **cfg))
    suite.update([g for _, g in pairs], [p for p, _ in pairs])
    return suite.compute().to_record()


def maps(result: dict) -> list[float]:
    return [result["map_r_25"], result["map_r_50"], result["map_r_75"]]


BOTH = pytest.mark.parametrize("protocol", ["voc", "coco"])


# ------------------------------------------------------------------------------ the cases where the protocols differ


def test_a_void_spill_scores_lower_under_voc_than_coco():
    target = box(8, 16, 8, 16)  # 64 px
    void = box(6, 18, 6, 18) & ~target  # the 2-px band around it: 144 - 64 = 80 px
    spill = box(6, 18, 6, 18)  # the object plus the whole void band: 144 px
    pair = [(preds([spill], [0], [0.9]), gt("a", [target], [0], void=void))]
    voc = evaluate(pair, "voc")
    # voc scores the prediction whole: IoU 64 / 144 = 0.444: a hit at 0.25 only.
    assert maps(voc) == pytest.approx([1.0, 0.0, 0.0])
    assert voc["abo"] == pytest.approx(64 / 144)
    # coco removes void from the prediction too: 64 / 64.
    coco = evaluate(pair, "coco")
    assert maps(coco) == pytest.approx([1.0, 1.0, 1.0])
    assert coco["abo"] == pytest.approx(1.0)
    # A void map handed over as uint8 is read as a mask, not bit-flipped.
    as_uint8 = evaluate([(preds([spill], [0], [0.9]), gt("a", [target], [0], void=void.to(torch.uint8)))], "coco")
    assert maps(as_uint8) == pytest.approx([1.0, 1.0, 1.0])


def test_b_duplicate_whose_argmax_gt_is_taken_is_a_false_positive_under_voc_only():
    g1, g2 = box(0, 10, 0, 10), box(0, 10, 10, 20)  # two cats side by side, 100 px each
    first = g1  # IoU 1 with g1
    # columns 2..14: 80 px on g1 (IoU 80/150 = 0.533, its argmax) and 50 px on g2 (IoU 50/180 = 0.278, the next best)
    duplicate = box(0, 10, 2, 15)
    assert mask_iou(duplicate[None], torch.stack([g1, g2]))[0].tolist() == pytest.approx([80 / 150, 50 / 180])
    pair = [(preds([first, duplicate], [0, 0], [0.9, 0.8]), gt("a", [g1, g2], [0, 0]))]
    voc = evaluate(pair, "voc")
    # voc, every threshold: TP then FP (its argmax g1 is taken; no fallback): precision 1, 1/2 at recall 1/2, 1/2
    # -> all-point AP 1/2 * 1 = 0.5.
    assert maps(voc) == pytest.approx([0.5, 0.5, 0.5])
    coco = evaluate(pair, "coco")
    # coco at 0.25: the duplicate falls back to g2 (0.278 >= 0.25): TP, TP -> AP 1. At 0.5 and 0.75 g2 is too far:
    # TP, FP -> precision 1 at recall 0..0.5, 0 after: 51 / 101 of the 101 points.
    assert maps(coco) == pytest.approx([1.0, 51 / 101, 51 / 101])


@BOTH
def test_c_all_point_and_101_point_ap_on_tp_fp_tp(protocol):
    """2 GT cats in images a and b, 3 predictions ranked across images; the false positive sits in image c, which has
    no GT at all, so this also checks that such an image's false positives are counted."""
    ga, gb, gc = gt("a", [box(0, 10, 0, 10)], [0]), gt("b", [box(5, 15, 5, 15)], [0]), gt("c", [], [])
    pairs = [
        (preds([box(0, 10, 0, 10)], [0], [0.9]), ga),
        (preds([box(20, 30, 20, 30)], [0], [0.8]), gc),
        (preds([box(5, 15, 5, 15)], [0], [0.7]), gb),
    ]
    expected = VOC_TP_FP_TP if protocol == "voc" else COCO_TP_FP_TP
    result = evaluate(pairs, protocol)
    assert maps(result) == pytest.approx([expected] * 3)
    assert result["per_class"]["cat"]["ap_50"] == pytest.approx(expected)
    assert abs(VOC_TP_FP_TP - COCO_TP_FP_TP) > 1e-3


@BOTH
def test_d_perfect_masks_give_ap_one(protocol):
    ring = box(0, 12, 0, 12) & ~box(1, 11, 1, 11)  # void border around the first cat, as VOC draws it
    g0 = gt("a", [box(1, 11, 1, 11), box(20, 30, 2, 9)], [0, 1], void=ring)
    g1 = gt("b", [box(4, 20, 4, 20)], [0])
    p0 = preds([box(1, 11, 1, 11), box(20, 30, 2, 9)], [0, 1], [0.9, 0.3])
    p1 = preds([box(4, 20, 4, 20)], [0], [0.5])
    result = evaluate([(p0, g0), (p1, g1)], protocol)
    assert maps(result) == pytest.approx([1.0, 1.0, 1.0])
    assert result["abo"] == pytest.approx(1.0)
    if protocol == "coco":
        assert result["map_r_50_95"] == pytest.approx(1.0)
    assert result["per_class"]["cat"]["n_gt"] == 2 and result["per_class"]["cat"]["ap_50"] == pytest.approx(1.0)
    # cow has no GT: its AP is undefined and it does not drag the mean down.
    assert result["per_class"]["cow"]["ap_50"] is None and result["per_class"]["cow"]["n_gt"] == 0
    assert (result["num_images"], result["num_gt"], result["num_predictions"]) == (2, 3, 3)
    assert result["protocol"] == protocol
    assert "pointing_accuracy" not in result and "cls_map" not in result


# ------------------------------------------------------------------------------------------ voc: chainercv's rules


def test_voc_a_prediction_below_the_threshold_takes_nothing():
    target = box(0, 10, 0, 10)  # 100 px
    weak = box(0, 10, 0, 3)  # IoU 30/100 = 0.3, scored higher
    exact = target
    result = evaluate([(preds([weak, exact], [0, 0], [0.9, 0.8]), gt("a", [target], [0]))], "voc")
    # 0.25: weak TP (takes the cat), exact FP -> precision 1, 1/2 at recall 1, 1 -> AP 1.
    # 0.5 and 0.75: weak FP without taking it, exact TP -> precision 0, 1/2 at recall 0, 1 -> AP 1 * 1/2 = 0.5.
    assert maps(result) == pytest.approx([1.0, 0.5, 0.5])


def test_voc_iou_exactly_at_the_threshold_is_a_hit():
    target = box(4, 14, 4, 14)  # 100 px
    half = box(4, 14, 4, 9)  # 50 px inside it: IoU exactly 0.5
    result = evaluate([(preds([half], [1], [0.8]), gt("a", [target], [1]))], "voc")
    assert maps(result) == pytest.approx([1.0, 1.0, 0.0])
    assert result["abo"] == pytest.approx(0.5)


def test_voc_equal_scores_rank_by_image_id_whatever_the_update_order():
    """b's prediction is a hit and a's a miss, both scored 0.5: a comes first (FP, TP: AP 1/2), in either order."""
    ga, gb = gt("a", [], []), gt("b", [box(0, 10, 0, 10)], [0])
    miss, hit = preds([box(20, 30, 20, 30)], [0], [0.5]), preds([box(0, 10, 0, 10)], [0], [0.5])
    assert evaluate([(miss, ga), (hit, gb)], "voc")["map_r_50"] == pytest.approx(0.5)
    assert evaluate([(hit, gb), (miss, ga)], "voc")["map_r_50"] == pytest.approx(0.5)


@BOTH
def test_empty_predictions_give_zeros(protocol):
    g = gt("a", [box(0, 8, 0, 8), box(10, 20, 10, 20)], [0, 2])
    result = evaluate([(Prediction(instances=Instances.empty((H, W))), g)], protocol)
    assert maps(result) == [0.0, 0.0, 0.0]
    assert result["abo"] == 0.0
    assert result["per_class"]["cow"]["ap_25"] == 0.0 and result["per_class"]["cat"]["ap_75"] == 0.0
    # Images with masks but no GT at all: mAP^r and ABO are undefined (None: null in metrics.json), not 0.0.
    no_gt = evaluate([(Prediction(instances=Instances.empty((H, W))), gt("b", [], []))], protocol)
    assert maps(no_gt) == [None] * 3 and no_gt["abo"] is None
    # No image with instance masks: nothing was scored, so no instance metric is reported.
    nothing = evaluate([(Prediction(), GroundTruth("c", (H, W)))], protocol)
    assert "map_r_50" not in nothing and "abo" not in nothing and nothing["metric_names"] == []


@BOTH
def test_false_positive_of_a_class_without_gt_only_makes_that_class_undefined(protocol):
    g = gt("a", [box(0, 10, 0, 10)], [0])
    result = evaluate([(preds([box(0, 10, 0, 10), box(0, 10, 0, 10)], [0, 1], [0.5, 0.9]), g)], protocol)
    # dog has no GT: undefined (chainercv: NaN), excluded; the mean is cat's perfect AP.
    assert maps(result) == pytest.approx([1.0, 1.0, 1.0])
    assert result["per_class"]["dog"]["ap_25"] is None


@BOTH
def test_abo_hand_computed(protocol):
    a, b, c = box(0, 10, 0, 10), box(20, 30, 0, 8), box(20, 30, 20, 30)  # 100, 80, 100 px
    g = gt("a", [a, b, c], [0, 1, 1])
    p1 = box(0, 10, 0, 5)  # inside a: IoU 50/100
    p2 = box(20, 30, 0, 10)  # covers b: IoU 80/100, and of another class than b: ABO ignores classes
    result = evaluate([(preds([p1, p2], [0, 0], [0.9, 0.8]), g)], protocol)
    # c has no overlapping prediction: best IoU 0.
    assert result["abo"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_voc_average_precision_by_hand():
    # FP, TP, TP over 2 GT: precision 0, 1/2, 2/3 -> envelope 2/3 from recall 0 to 1 -> 2/3.
    assert voc_average_precision(torch.tensor([False, True, True]), 2) == pytest.approx(2 / 3)
    # TP, TP, FP: the false positive comes after full recall -> 1.
    assert voc_average_precision(torch.tensor([True, True, False]), 2) == pytest.approx(1.0)
    # Recall stops at 1/3: the sentinel (recall 1, precision 0) adds nothing -> 1/3.
    assert voc_average_precision(torch.tensor([True]), 3) == pytest.approx(1 / 3)
    assert voc_average_precision(torch.zeros(0, dtype=torch.bool), 2) == 0.0
    with pytest.raises(ValueError, match="undefined"):
        voc_average_precision(torch.tensor([True]), 0)


# --------------------------------------------------------------------------------------- pointing accuracy (ours)


def test_pointing_hand_example():
    a, b, c = box(0, 10, 0, 10), box(20, 30, 20, 30), box(20, 30, 0, 10)
    g = gt("a", [a, b, c], [0, 1, 0])
    pred = Prediction(
        instances=Instances.empty((H, W)),
        peaks_yx=torch.tensor([[5.0, 5.0], [5.0, 5.0], [25.0, 25.0], [15.0, 15.0], [9.4, 2.0], [9.6, 2.0]]),
        peak_labels=torch.tensor([0, 1, 1, 0, 0, 0]),
    )
    # hit (a), wrong class, hit (b), background, rounds to row 9 (hit a), rounds to row 10 (miss)
    result = evaluate([(pred, g)], metrics=["pointing"])
    assert result["pointing_accuracy"] == pytest.approx(3 / 6)
    assert result["pointing_recall"] == pytest.approx(2 / 3)  # a and b pointed at, c not
    assert result["num_peaks"] == 6


def test_pointing_from_instance_peaks_and_tolerance():
    from ranprm.eval import prediction_from_instances

    g = gt("a", [box(0, 10, 0, 10)], [0])
    # seeding peaks: one inside, one 2 px right of the box (column 11; the box ends at column 9)
    p = preds([box(0, 10, 0, 10), box(0, 10, 0, 12)], [0, 0], [0.9, 0.8], peaks=[[5.0, 5.0], [5.0, 11.0]])
    p = prediction_from_instances(p.instances)
    assert evaluate([(p, g)], metrics=["pointing"])["pointing_accuracy"] == pytest.approx(0.5)
    assert evaluate([(p, g)], metrics=["pointing"], pointing_tolerance=1)["pointing_accuracy"] == pytest.approx(0.5)
    assert evaluate([(p, g)], metrics=["pointing"], pointing_tolerance=2)["pointing_accuracy"] == pytest.approx(1.0)
    # Instances without a seeding peak carry no pointing information: the metric is left out.
    no_peaks = prediction_from_instances(preds([box(0, 10, 0, 10)], [0], [0.9]).instances)
    assert "pointing_accuracy" not in evaluate([(no_peaks, g)], metrics=["pointing"])


# ------------------------------------------------------------------------------------------------ classification


def test_classification_map_hand_example():
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.7, 0.1], [0.1, 0.6, 0.3]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    # cat: ranked P (p 1, r 1/2), N, P (p 2/3, r 1) -> 1/2 * 1 + 1/2 * 2/3 = 5/6;
    # dog: both positives first -> 1; cow: no positive image -> undefined, left out of the mean (torchmetrics'
    # "macro" would count it as 0 and give (5/6 + 1 + 0) / 3).
    cls_map, per_class = classification_map(scores, targets)
    assert per_class[0] == pytest.approx(5 / 6) and per_class[1] == pytest.approx(1.0) and per_class[2] is None
    assert cls_map == pytest.approx((5 / 6 + 1.0) / 2)
    suite = EvaluatorSuite(CLASSES, EvalConfig(metrics=("classification",)))
    gts = [GroundTruth(str(i), (H, W), class_targets=targets[i]) for i in range(3)]
    predictions = [Prediction(class_scores=scores[i]) for i in range(3)]
    suite.update(gts[:2], predictions[:2])  # accumulated over two batches
    suite.update(gts[2:], predictions[2:])
    result = suite.compute().to_record()
    assert result["cls_map"] == pytest.approx((5 / 6 + 1.0) / 2)
    assert result["per_class"]["cat"]["cls_ap"] == pytest.approx(5 / 6)
    assert result["per_class"]["cow"]["cls_ap"] is None


# -------------------------------------------------------------------------------------------- reports and errors


def test_table_and_summary_name_the_protocol():
    g = gt("a", [box(4, 14, 4, 14)], [1])
    suite = EvaluatorSuite(CLASSES, EvalConfig(protocol="voc", metrics=("instance_ap", "abo")))
    suite.update([g], [preds([box(4, 14, 4, 10)], [1], [0.8])])  # IoU 0.6
    result = suite.compute()
    lines = per_class_table(result).splitlines()
    assert lines[0] == "| class | GT | AP@0.25 | AP@0.5 | AP@0.75 |"
    assert "| dog | 1 | 100.0 | 100.0 | 0.0 |" in lines
    assert "| cat | 0 | – | – | – |" in lines
    assert "| **mean** | 1 | 100.0 | 100.0 | 0.0 |" in lines
    assert any("protocol voc" in line and "chainercv" in line for line in lines)
    line = summary(result)
    assert "\n" not in line and line.startswith("[protocol voc]") and "100.0 / 100.0 / 0.0" in line
    assert "ABO 60.0" in line and "(1 images, 1 GT, 1 predictions)" in line
    record = result.to_record()
    assert record["metric_names"] == ["map_r_25", "map_r_50", "map_r_75", "abo"]
    coco = EvaluatorSuite(CLASSES, EvalConfig(protocol="coco", metrics=("instance_ap",)))
    coco.update([g], [preds([box(4, 14, 4, 10)], [1], [0.8])])
    coco_table = per_class_table(coco.compute())
    assert "AP@.5:.95" in coco_table.splitlines()[0] and "protocol coco" in coco_table


def test_mismatched_inputs_raise():
    g = gt("a", [box(0, 4, 0, 4)], [0])
    suite = EvaluatorSuite(CLASSES)
    with pytest.raises(ValueError, match="label outside"):
        suite.update([g], [preds([box(0, 4, 0, 4)], [3], [0.5])])
    with pytest.raises(ValueError, match="predicted masks"):
        suite.update([g], [Prediction(instances=Instances.empty((8, 8)))])
    with pytest.raises(ValueError, match="pair up"):
        suite.update([g, g], [Prediction()])


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"protocol": "pascal"}, r"eval\.protocol='pascal' is not a known evaluation protocol; choose one of"),
        ({"metrics": ["instance_ap", "nope"]}, r"eval\.metrics='nope' is not a known evaluator"),
        ({"metrics": "abo"}, r"eval\.metrics='abo' must be a list"),
        ({"pointing_game_tolerance": -1}, r"eval\.pointing_game_tolerance=-1 must be a float >= 0"),
        ({"pointing_tolerance": 1.5}, r"eval\.pointing_tolerance=1\.5 must be a int >= 0"),
    ],
)
def test_bad_eval_config_is_a_one_line_error(cfg, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig.from_config(cfg)


def test_defaults_are_the_standard_evaluators_and_the_voc_protocol():
    cfg = EvalConfig.from_config({"every_n_epochs": None, "max_images": 3})  # other readers' keys are ignored
    assert cfg.protocol == "voc" and cfg.pointing_game_tolerance == 18
    assert set(cfg.metrics) <= set(EVALUATORS.names())
    assert set(cfg.metrics) == {"instance_ap", "abo", "pointing", "pointing_game", "classification"}


def test_boxes_are_checked_nowhere_but_used_by_the_pointing_game_only():
    """Boxes alone (no masks) feed the pointing game and nothing else."""
    g = GroundTruth("a", (H, W), boxes=Boxes(torch.tensor([[0.0, 0, 9, 9]]), torch.tensor([0]), torch.tensor([False])))
    p = Prediction(class_scores=torch.tensor([2.0, 0.0, 0.0]), class_max_yx=torch.tensor([[5.0, 5.0]] * 3))
    result = evaluate([(p, g)], metrics=["instance_ap", "abo", "pointing", "pointing_game"])
    assert result["metric_names"] == ["pointing_map"] and result["pointing_map"] == pytest.approx(1.0)


@BOTH
def test_undefined_metrics_are_none_with_a_note_not_zero(protocol):
    """A cow predicted on an image without any GT instance, and a cat found exactly on another: the cat's AP is 1,
    dog and cow have no GT (no AP, "–", left out of the mean: mAP^r = 1, not 1/3); ABO over the one cat is 1. On
    the object-free image alone every instance metric and the pointing figures are undefined: null and "–", with a
    note saying why, never 0.0."""
    cat = box(0, 10, 0, 10)
    empty_image = (preds([box(20, 30, 20, 30)], [2], [0.9]), gt("a", [], []))
    cat_image = (preds([cat], [0], [0.8]), gt("b", [cat], [0]))
    both = evaluate([empty_image, cat_image], protocol)
    assert maps(both) == pytest.approx([1.0, 1.0, 1.0]) and both["abo"] == pytest.approx(1.0)
    assert both["per_class"]["cat"]["ap_50"] == pytest.approx(1.0)
    assert both["per_class"]["dog"]["ap_50"] is None and both["per_class"]["cow"]["ap_50"] is None

    suite = EvaluatorSuite(CLASSES, EvalConfig(protocol=protocol, metrics=("instance_ap", "abo", "pointing")))
    no_peak = Prediction(instances=Instances.empty((H, W)), peaks_yx=torch.zeros(0, 2), peak_labels=torch.zeros(0))
    suite.update([gt("a", [], [])], [no_peak])
    result = suite.compute()
    record = result.to_record()
    assert all(record[name] is None for name in record["metric_names"])
    assert record["num_gt"] == 0 and record["num_images"] == 1
    table = per_class_table(result)
    mean_row = next(line for line in table.splitlines() if line.startswith("| **mean**"))
    assert mean_row.count("–") == sum(name.startswith("map_r_") for name in result.metrics)  # each AP column's mean
    assert "mAP^r: undefined" in table and "ABO: undefined" in table and "pointing accuracy: undefined" in table
    assert "0.0" not in summary(result) and "no GT instance" in summary(result)
