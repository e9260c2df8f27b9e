"""experiments/attention_prm/analysis.py: paired differences, classification held equal and the bootstrap, on
hand-built masks whose answers are worked out in the comments (the records come from the real evaluators)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from experiments.attention_prm.analysis import (
    Difference,
    Pair,
    correct_pairs,
    decode_records,
    encode_records,
    pack_records,
    paired_difference,
    percentile_interval,
    record_metrics,
    restrict,
    unpack_records,
    verdict,
)
from ranprm.eval import EvalConfig, EvaluatorSuite
from tests.test_metrics import CLASSES, VOC_TP_FP_TP, box, gt, preds

CAT, DOG = 0, 1


def _image(image_id, gt_masks, gt_labels, masks, labels, scores, logits):
    """One image's GroundTruth and Prediction, with image-level targets from its GT and the model's class logits."""
    g = gt(image_id, gt_masks, gt_labels)
    targets = torch.zeros(len(CLASSES), dtype=torch.long)
    targets[gt_labels] = 1
    p = preds(masks, labels, scores)
    return dataclasses.replace(g, class_targets=targets), dataclasses.replace(p, class_scores=torch.tensor(logits))


def _records(images) -> dict:
    """The per-image records the study keeps, as `ranprm-evaluate records=true` then the cell file hold them."""
    suite = EvaluatorSuite(CLASSES, EvalConfig(metrics=("instance_ap", "abo", "classification")))
    suite.update([g for g, _ in images], [p for _, p in images])
    return decode_records(json.loads(json.dumps(encode_records(suite.image_records()))))


CAT_A, CAT_B = box(0, 10, 0, 10), box(5, 15, 5, 15)
MISS = box(20, 30, 20, 30)
LOGITS = [2.0, -3.0, -3.0]  # cat present (p > 1/2), the others absent


def perfect() -> dict:
    """Both cats found exactly: AP 1 at every IoU, ABO 1."""
    return _records([
        _image("a", [CAT_A], [CAT], [CAT_A], [CAT], [0.9], LOGITS),
        _image("b", [CAT_B], [CAT], [CAT_B], [CAT], [0.7], LOGITS),
    ])  # fmt: skip


def tp_fp_tp() -> dict:
    """Ranked TP (a, 0.9), FP (a, 0.8: a miss), TP (b, 0.7): AP 5/6 at every IoU; ABO 1 (both cats found)."""
    return _records([
        _image("a", [CAT_A], [CAT], [CAT_A, MISS], [CAT, CAT], [0.9, 0.8], LOGITS),
        _image("b", [CAT_B], [CAT], [CAT_B], [CAT], [0.7], LOGITS),
    ])  # fmt: skip


def test_records_survive_json_and_give_the_evaluators_numbers():
    records = tp_fp_tp()
    metrics = record_metrics([records["a"], records["b"]], CLASSES)
    assert [metrics[k] for k in ("map_r_25", "map_r_50", "map_r_75")] == pytest.approx([VOC_TP_FP_TP] * 3)
    assert metrics["abo"] == pytest.approx(1.0)
    # A resample that repeats image b: GT 3 cats; TP 0.9, FP 0.8, TP 0.7, TP 0.7 -> precision 1, 1/2, 2/3, 3/4 at
    # recall 1/3, 1/3, 2/3, 1: all-point AP = 1/3 * 1 + 2/3 * 3/4 = 5/6 (the envelope after recall 1/3 is 3/4).
    repeated = record_metrics([records["a"], records["b"], records["b"]], CLASSES)
    assert repeated["map_r_50"] == pytest.approx(1 / 3 + 2 / 3 * 3 / 4)


def test_correct_pairs_are_present_classes_with_logit_at_least_zero():
    image = _records([_image("a", [CAT_A, box(20, 30, 0, 10)], [CAT, DOG], [], [], [], [0.0, -0.1, 5.0])])["a"]
    # cat: present, logit 0 (p = 1/2) -> correct; dog: present, logit < 0 -> missed; cow: absent, logit 5 -> a false
    # alarm, never a correct pair.
    assert correct_pairs(image) == {CAT}


def test_restrict_keeps_only_the_chosen_classes_instances_and_predictions():
    dog = box(20, 30, 0, 10)
    image = _records([_image("a", [CAT_A, dog], [CAT, DOG], [CAT_A, MISS], [CAT, DOG], [0.9, 0.8], LOGITS)])["a"]
    # Unrestricted: cat AP 1, dog AP 0 (its one prediction misses) -> mAP 1/2; ABO (1 + 0) / 2.
    full = record_metrics([image], CLASSES)
    assert (full["map_r_50"], full["abo"]) == pytest.approx((0.5, 0.5))
    only_cat = restrict(image, {CAT})
    assert only_cat["instance_ap"][0].tolist() == [1, 0, 0] and only_cat["instance_ap"][1] == 1
    restricted = record_metrics([only_cat], CLASSES)
    assert (restricted["map_r_50"], restricted["abo"]) == pytest.approx((1.0, 1.0))


def test_paired_difference_per_seed_mean_std_and_positive_count():
    # seed 0: perfect - tp_fp_tp = 1 - 5/6 = 1/6 at every IoU, ABO 0; seed 1: the same models swapped: -1/6.
    # seed 2: identical models: 0. Mean 0, sample std sqrt((1/36 + 1/36) / 2) = 1/6, 1 of 3 positive.
    pairs = [Pair(0, perfect(), tp_fp_tp()), Pair(1, tp_fp_tp(), perfect()), Pair(2, perfect(), perfect())]
    diffs = paired_difference(pairs, CLASSES)
    assert diffs["map_r_50"].per_seed == pytest.approx([1 / 6, -1 / 6, 0.0])
    assert (diffs["map_r_50"].mean, diffs["map_r_50"].std) == pytest.approx((0.0, 1 / 6))
    assert diffs["map_r_50"].positive == 1
    assert diffs["abo"].per_seed == pytest.approx([0.0, 0.0, 0.0])
    assert diffs["map_r_50"].interval is None  # no bootstrap asked for


def test_classification_held_equal_scores_only_pairs_both_models_got_right():
    # Model B does not classify cat in image a (logit -1), and there it predicts the cat badly; in image b both
    # classify it and B is exact. A is exact everywhere.
    a = perfect()
    b = _records([
        _image("a", [CAT_A], [CAT], [MISS], [CAT], [0.9], [-1.0, -3.0, -3.0]),
        _image("b", [CAT_B], [CAT], [CAT_B], [CAT], [0.7], LOGITS),
    ])  # fmt: skip
    # Plain: B ranks FP (a, 0.9) then TP (b, 0.7) over 2 cats: precision 0, 1/2 at recall 0, 1/2 -> AP 1/2 * 1/2 =
    # 1/4; A - B = 3/4. ABO: B (0 + 1) / 2 -> A - B = 1/2.
    plain = paired_difference([Pair(0, a, b)], CLASSES)
    assert (plain["map_r_50"].mean, plain["abo"].mean) == pytest.approx((0.75, 0.5))
    # Held equal: only (b, cat) is correct for both: both exact there -> 0 and 0.
    held = paired_difference([Pair(0, a, b)], CLASSES, held_equal=True)
    assert (held["map_r_50"].mean, held["abo"].mean) == pytest.approx((0.0, 0.0))


def test_bootstrap_interval_is_seeded_and_collapses_where_every_resample_is_the_same():
    pairs = [Pair(0, perfect(), tp_fp_tp())]
    first = paired_difference(pairs, CLASSES, n_boot=40, seed=3)
    again = paired_difference(pairs, CLASSES, n_boot=40, seed=3)
    assert first["map_r_50"].interval == again["map_r_50"].interval
    lo, hi = first["map_r_50"].interval
    # Every resample of {a, b}: A is exact (AP 1); B's AP is 1 on (a, a) (ranked TP, TP, FP, FP over 2 cats), 1 on
    # (b, b), 5/6 on (a, b): the differences lie in {0, 1/6}, and so does the interval.
    assert 0.0 <= lo <= hi <= 1 / 6 + 1e-12
    # Identical models differ by 0 on every resample.
    same = paired_difference([Pair(0, perfect(), perfect())], CLASSES, n_boot=20, seed=0)
    assert same["map_r_50"].interval == (0.0, 0.0)


def test_percentile_interval_matches_linear_interpolation_of_order_statistics():
    values = [float(v) for v in range(101)]  # 0..100: the 2.5% quantile sits at position 2.5 -> 2.5
    assert percentile_interval(values, 0.95) == pytest.approx((2.5, 97.5))
    assert percentile_interval([4.0], 0.95) == (4.0, 4.0)


def test_verdict_says_what_interval_and_seeds_show():
    up = Difference("map_r_50", [0.02, 0.03, 0.01], interval=(0.005, 0.04))
    assert "higher, consistently over seeds" in verdict(up, "attention")
    mixed = Difference("map_r_50", [0.02, -0.01, 0.01], interval=(0.001, 0.03))
    assert "seeds disagree" in verdict(mixed, "attention")
    none = Difference("map_r_50", [0.02, -0.01, 0.01], interval=(-0.01, 0.03))
    assert "no evidence of a difference" in verdict(none, "attention")
    assert math.isclose(up.mean, 0.02) and up.excludes_zero and not none.excludes_zero


def test_packed_records_keep_what_every_variant_shares_once_and_unpack_to_each_variants_own():
    suites = {}
    for name, masks in (("exact", [CAT_A]), ("miss", [MISS])):
        suite = EvaluatorSuite(CLASSES, EvalConfig(metrics=("instance_ap", "abo", "classification")))
        suite.update(*map(list, zip(_image("a", [CAT_A], [CAT], masks, [CAT], [0.9], LOGITS), strict=True)))
        suites[name] = suite.image_records()
    packed = json.loads(json.dumps(pack_records(suites)))
    # the class logits are the same in both variants (one checkpoint): stored once; the instances differ
    assert set(packed["shared"]["a"]) == {"classification"}
    assert set(packed["variants"]["exact"]["a"]) == {"instance_ap", "abo"}
    exact, miss = unpack_records(packed, "exact")["a"], unpack_records(packed, "miss")["a"]
    assert correct_pairs(exact) == correct_pairs(miss) == {CAT}
    assert record_metrics([exact], CLASSES)["map_r_50"] == 1.0 and record_metrics([miss], CLASSES)["map_r_50"] == 0.0
    assert unpack_records(packed, "absent") == {}
