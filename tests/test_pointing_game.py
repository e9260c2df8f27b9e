"""The pointing game (PRM's pointing mAP): known answers by hand, the box and map-maximum conversions."""

from __future__ import annotations

import pytest
import torch

from ranprm.data.voc import ObjectAnnotation
from ranprm.eval import Boxes, EvalConfig, EvaluatorSuite, GroundTruth, Prediction, ground_truth
from ranprm.eval.inputs import boxes_from_objects, class_map_maxima

CLASSES = ("cat", "dog")
SIZE = (64, 64)


def image(image_id: str, boxes: list[tuple[int, tuple[float, float, float, float], bool]]) -> GroundTruth:
    """A ground truth with boxes only: (label, (x0, y0, x1, y1) 0-based inclusive, difficult)."""
    return GroundTruth(
        image_id,
        SIZE,
        boxes=Boxes(
            xyxy=torch.tensor([b for _, b, _ in boxes], dtype=torch.float64).reshape(-1, 4),
            labels=torch.tensor([label for label, _, _ in boxes], dtype=torch.long),
            difficult=torch.tensor([d for _, _, d in boxes], dtype=torch.bool),
        ),
    )


def point(scores: list[float], maxima: list[tuple[float, float]]) -> Prediction:
    """Class scores and each class map's maximum (y, x)."""
    return Prediction(class_scores=torch.tensor(scores), class_max_yx=torch.tensor(maxima, dtype=torch.float32))


def pointing_map(pairs: list[tuple[GroundTruth, Prediction]], **cfg) -> dict:
    suite = EvaluatorSuite(CLASSES, EvalConfig(metrics=("pointing_game",), **cfg))
    suite.update([g for g, _ in pairs], [p for _, p in pairs])
    return suite.compute().to_record()


CAT_A = (0, (0.0, 0.0, 9.0, 9.0), False)
CAT_C = (0, (40.0, 40.0, 50.0, 50.0), False)
DOG_C = (1, (0.0, 30.0, 20.0, 40.0), False)


def test_hand_ranking_hits_misses_and_negatives():
    pairs = [
        # a: a cat, its map peaks inside the box: a hit, ranked first for cat (score 3).
        (image("a", [CAT_A]), point([3.0, -1.0], [(5, 5), (60, 60)])),
        # b: no cat, scored 2 for cat: a negative, a false positive wherever it points.
        (image("b", []), point([2.0, 0.5], [(5, 5), (5, 5)])),
        # c: a cat at x, y 40..50, its map peaks at (5, 5): 35 px away, more than 18: a miss, a false positive.
        (image("c", [CAT_C, DOG_C]), point([1.0, 2.0], [(5, 5), (35, 10)])),
    ]
    result = pointing_map(pairs)
    # cat: TP, FP, FP over 2 positives: precision 1, 1/2, 1/3 at recall 1/2 -> AP 1/2.
    assert result["per_class"]["cat"]["pointing_ap"] == pytest.approx(0.5)
    # dog: c (score 2, hit: (35, 10) is inside the box y 30..40, x 0..20) ranks above b (0.5, negative) and a
    # (-1, negative): TP, FP, FP over 1 positive -> AP 1.
    assert result["per_class"]["dog"]["pointing_ap"] == pytest.approx(1.0)
    assert result["pointing_map"] == pytest.approx(0.75)


def test_tolerance_is_inclusive_and_configurable():
    g = image("a", [CAT_A])  # x1 = 9
    at_edge = point([1.0, 0.0], [(5.0, 9.0 + 18.0), (0, 0)])  # exactly 18 px right of the box: a hit
    beyond = point([1.0, 0.0], [(5.0, 9.0 + 18.5), (0, 0)])
    assert pointing_map([(g, at_edge)])["pointing_map"] == pytest.approx(1.0)
    assert pointing_map([(g, beyond)])["pointing_map"] == pytest.approx(0.0)
    assert pointing_map([(g, beyond)], pointing_game_tolerance=19)["pointing_map"] == pytest.approx(1.0)
    assert pointing_map([(g, at_edge)], pointing_game_tolerance=0)["pointing_map"] == pytest.approx(0.0)


def test_difficult_objects_count_and_classes_without_positives_are_left_out():
    difficult_cat = (0, (0.0, 0.0, 9.0, 9.0), True)
    pairs = [
        (image("a", [difficult_cat]), point([2.0, 5.0], [(4, 4), (4, 4)])),  # positive (difficult), hit
        (image("b", []), point([1.0, 4.0], [(4, 4), (4, 4)])),
    ]
    result = pointing_map(pairs)
    assert result["per_class"]["cat"]["pointing_ap"] == pytest.approx(1.0)
    assert result["per_class"]["dog"]["pointing_ap"] is None  # no image holds a dog: undefined, not 0
    assert result["pointing_map"] == pytest.approx(1.0)


def test_an_object_without_a_box_makes_its_image_positive_but_cannot_be_hit():
    nan = float("nan")
    pairs = [(image("a", [(0, (nan, nan, nan, nan), False)]), point([1.0, 0.0], [(4, 4), (4, 4)]))]
    assert pointing_map(pairs)["per_class"]["cat"]["pointing_ap"] == pytest.approx(0.0)


def test_without_scores_or_boxes_nothing_is_reported():
    assert "pointing_map" not in pointing_map([(image("a", [CAT_A]), Prediction())])
    assert "pointing_map" not in pointing_map([(GroundTruth("a", SIZE), point([1.0, 0.0], [(4, 4), (4, 4)]))])


def test_voc_boxes_become_zero_based_and_a_missing_box_nan():
    objects = [ObjectAnnotation("dog", True, (1, 2, 10, 20)), ObjectAnnotation("cat", False, (0, 0, 0, 0))]
    boxes = boxes_from_objects(objects, CLASSES)
    assert boxes.xyxy[0].tolist() == [0.0, 1.0, 9.0, 19.0]
    assert torch.isnan(boxes.xyxy[1]).all()
    assert boxes.labels.tolist() == [1, 0] and boxes.difficult.tolist() == [True, False]
    g = ground_truth("x", (32, 32), CLASSES, objects=objects)
    assert g.instances is None and g.boxes is not None


def test_class_map_maxima_are_cell_centres_in_image_pixels():
    crms = torch.zeros(2, 2, 4)
    crms[0, 1, 0] = 5.0  # cat: row 1, column 0
    crms[1, 0, 3] = 1.0  # dog: row 0, column 3
    crms[1, 1, 2] = 1.0  # a tie with an element later in row-major order: the first wins
    yx = class_map_maxima(crms, (64, 128))
    # cells of 32 x 32 px: cell (1, 0) is centred at ((1 + 0.5) * 32 - 0.5, 0.5 * 32 - 0.5) = (47.5, 15.5)
    assert yx.tolist() == [[47.5, 15.5], [15.5, 3.5 * 32 - 0.5]]
