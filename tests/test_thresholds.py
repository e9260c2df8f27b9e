"""Threshold rules by name, the presets per role, the probability floor and the per-class calibration."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ranprm.errors import ConfigError
from ranprm.prm.peaks import peak_filter_value, peak_mask
from ranprm.prm.thresholds import (
    THRESHOLD_RULES,
    ClassCalibration,
    ThresholdRule,
    Thresholds,
    build_rule,
    select_classes,
    select_peaks,
)

VALUES = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
PRESETS = Path(__file__).resolve().parents[1] / "conf" / "threshold"


@pytest.mark.parametrize(
    ("spec", "cutoff", "valid"),
    [
        ({"kind": "fixed", "value": 3.5}, 3.5, [4.0, 10.0]),
        ({"kind": "mean"}, 4.0, [4.0, 10.0]),  # (1 + 2 + 3 + 4 + 10) / 5
        ({"kind": "median"}, 3.0, [3.0, 4.0, 10.0]),
        ({"kind": "quantile", "q": 0.75}, 4.0, [4.0, 10.0]),  # position 0.75 * 4 = 3: the 4th value
        ({"kind": "quantile", "q": 0.6}, 3.4, [4.0, 10.0]),  # position 2.4: 3 + 0.4 * (4 - 3)
        ({"kind": "max"}, 10.0, [10.0]),
        ({"kind": "none"}, float("-inf"), [1.0, 2.0, 3.0, 4.0, 10.0]),
    ],
)
def test_rules_known_cutoffs(spec, cutoff, valid):
    rule = build_rule(spec, "threshold.peaks")
    assert rule.cutoff(VALUES).item() == pytest.approx(cutoff)
    assert VALUES[select_peaks(VALUES, rule)].tolist() == valid


def test_q3_of_a_known_vector():
    # 1..8: Q3 sits at position 0.75 * 7 = 5.25 between the 6th (6) and 7th (7) values: 6.25
    assert build_rule({"kind": "quantile", "q": 0.75}, "x").cutoff(torch.arange(1.0, 9.0)).item() == 6.25


def test_one_median_the_official_lower_middle_value():
    """PRM's official filter is torch.median of the flattened map: the lower middle value for an even count."""
    median = build_rule("median", "head.peak_filter")
    assert median.cutoff(torch.tensor([1.0, 2.0, 3.0, 10.0])).item() == 2.0
    assert build_rule({"kind": "quantile", "q": 0.5}, "x").cutoff(torch.tensor([1.0, 2.0, 3.0, 10.0])).item() == 2.5
    # The training peak filter uses the same rule: a 2 x 2 map [[1, 2], [3, 10]] has floor 2, not 2.5.
    crm = torch.tensor([[[[1.0, 2.0], [3.0, 10.0]]]])
    assert peak_filter_value(crm, "median").flatten().tolist() == [2.0]
    assert peak_filter_value(crm, median).flatten().tolist() == [2.0]


def test_training_filter_keeps_a_maximum_at_the_lower_middle_value():
    # Along one row: maxima 4 (x=0), 2 (x=2) and 5 (x=4); sorted -5, -1, 2, 3, 4, 5: the lower middle value is 2,
    # the mean of the middle pair 2.5.
    crm = torch.tensor([[[[4.0, -1.0, 2.0, -5.0, 5.0, 3.0]]]])
    assert peak_mask(crm, 3, "median")[0, 0, 0].nonzero().flatten().tolist() == [0, 2, 4]
    assert peak_mask(crm, 3, {"kind": "quantile", "q": 0.5})[0, 0, 0].nonzero().flatten().tolist() == [0, 4]


def test_rules_work_on_batches_along_the_last_dimension():
    values = torch.tensor([[1.0, 2.0, 3.0, 10.0], [4.0, 4.0, 8.0, 0.0]])
    assert build_rule("mean", "x").cutoff(values).tolist() == [4.0, 4.0]
    assert build_rule("median", "x").cutoff(values).tolist() == [2.0, 4.0]
    assert build_rule("max", "x").valid(values).tolist() == [[False, False, False, True], [False, False, True, False]]


def test_empty_candidates_select_nothing():
    assert build_rule("mean", "x").cutoff(torch.zeros(0)).item() == float("inf")
    assert select_peaks(torch.zeros(0), build_rule("quantile", "x")).numel() == 0


def test_rule_specs_and_errors_name_the_option():
    assert build_rule(30, "threshold.peaks") == build_rule({"kind": "fixed", "value": 30.0}, "y")
    assert build_rule("0.5", "head.peak_filter").cutoff(VALUES).item() == 0.5  # a number from the command line
    with pytest.raises(ConfigError, match=r"threshold.classes.kind='third_quartile' is not a known threshold rule"):
        build_rule({"kind": "third_quartile"}, "threshold.classes")
    with pytest.raises(ConfigError, match=r"q=1.5"):
        build_rule({"kind": "quantile", "q": 1.5}, "threshold.classes")
    with pytest.raises(ConfigError, match=r"threshold.classes.q='abc' must be a number"):
        build_rule({"kind": "quantile", "q": "abc"}, "threshold.classes")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['value'\]"):
        build_rule({"kind": "mean", "value": 3}, "threshold.peaks")
    with pytest.raises(ConfigError, match="needs a `kind`"):
        build_rule({"q": 0.75}, "threshold.classes")
    with pytest.raises(ConfigError, match="classes and peaks"):
        Thresholds.from_config({"peaks": {"kind": "mean"}})
    with pytest.raises(ConfigError, match="class_distribution='weekly'"):
        Thresholds.from_config({"classes": "mean", "peaks": "mean", "class_distribution": "weekly"})


# ------------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("*.yaml")))
def test_every_preset_states_its_probability_floor_and_parses(preset):
    cfg = OmegaConf.to_container(OmegaConf.load(PRESETS / f"{preset}.yaml"))
    assert cfg["name"] == preset and "min_class_prob" in cfg  # ranprm's floor is never implicit
    Thresholds.from_config(cfg)


def preset(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(PRESETS / f"{name}.yaml"))


def test_seed_preset_is_q3_for_classes_and_mean_for_peaks():
    thr = Thresholds.from_config(preset("seed"))
    assert thr.classes == build_rule({"kind": "quantile", "q": 0.75}, "x") and thr.peaks == build_rule("mean", "x")
    assert thr.class_distribution == "image" and thr.min_class_prob == 0.1
    fixed = Thresholds.from_config(preset("fixed"))
    assert (fixed.classes.cutoff(VALUES).item(), fixed.peaks.cutoff(VALUES).item(), fixed.min_class_prob) == (0, 30, 0)


def test_fixed_preset_is_the_official_test_class_at_least_zero_peak_above_thirty():
    """PRM's official code: `aggregation >= class_threshold` (0) and `peak_val > peak_threshold` (30): a peak at
    exactly 30 is dropped, a class score of exactly 0 kept; `strict` is the fixed rule's option, off by default."""
    fixed = Thresholds.from_config(preset("fixed"))
    assert select_peaks(torch.tensor([29.0, 30.0, 30.5]), fixed.peaks).tolist() == [False, False, True]
    assert select_classes(torch.tensor([[-0.5, 0.0, 2.0]]), fixed).tolist() == [[False, True, True]]
    inclusive = build_rule({"kind": "fixed", "value": 30.0}, "x")
    assert select_peaks(torch.tensor([29.0, 30.0, 30.5]), inclusive).tolist() == [False, True, True]
    strict_classes = Thresholds(build_rule({"kind": "fixed", "value": 0.0, "strict": True}, "x"), inclusive)
    assert select_classes(torch.tensor([[-0.5, 0.0, 2.0]]), strict_classes).tolist() == [[False, False, True]]
    # the other presets keep `>=`
    assert not any(getattr(Thresholds.from_config(preset(n)).peaks, "strict", False) for n in ("seed", "mean", "q3"))


def test_per_image_q3_keeps_five_of_twenty_classes_unless_the_floor_stops_it():
    """Why the floor exists: the literal per-image Q3 keeps 5 of 20 classes in every image, even an empty one."""
    empty_image = torch.linspace(-9.0, -5.0, 20)[None]  # every class improbable: sigmoid(-5) < 0.007
    no_floor = Thresholds.from_config({**preset("seed"), "min_class_prob": 0.0})
    assert int(select_classes(empty_image, no_floor).sum()) == 5
    assert int(select_classes(empty_image, Thresholds.from_config(preset("seed"))).sum()) == 0


def test_class_selection_per_image_with_the_floor():
    thr = Thresholds(build_rule("mean", "x"), build_rule("mean", "x"), min_class_prob=0.5)
    scores = torch.tensor([[3.0, -2.0, 1.0, -6.0], [-3.0, -4.0, -5.0, -6.0]])
    # image 0: mean -1 -> classes 0 and 2 (both prob > 0.5); image 1: relative rule keeps 0 and 1, floor drops them
    assert select_classes(scores, thr).tolist() == [[True, False, True, False], [False, False, False, False]]
    fixed = Thresholds(build_rule(0.0, "x"), build_rule(30.0, "x"))
    assert select_classes(scores, fixed).tolist() == [[True, False, True, False], [False] * 4]


# --------------------------------------------------------------------------------------- per-class reading
def test_class_q3_over_a_calibration_split_cuts_each_class_at_its_own_q3():
    # Class 0's calibration scores 1..8 (Q3 6.25), class 1's 10..80 (Q3 62.5).
    scores = torch.stack([torch.arange(1.0, 9.0), torch.arange(10.0, 90.0, 10.0)], 1)
    calibration = ClassCalibration(scores, "held-out", evaluated_split=False)
    thr = Thresholds.from_config(preset("class_q3"), calibration)
    assert thr.class_cutoffs == (6.25, 62.5)
    images = torch.tensor([[6.0, 63.0], [7.0, 50.0]])
    assert select_classes(images, thr).tolist() == [[False, True], [True, False]]
    uncalibrated = Thresholds.from_config(preset("class_q3"))
    assert uncalibrated.needs_calibration
    with pytest.raises(ConfigError, match="calibration.split"):
        select_classes(images, uncalibrated)


def test_class_calibration_survives_the_checkpoint_dict():
    calibration = ClassCalibration(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "Main/train", evaluated_split=True)
    back = ClassCalibration.from_dict(calibration.to_dict())
    assert torch.equal(back.scores, calibration.scores) and (back.split, back.evaluated_split) == ("Main/train", True)
    assert back.summary() == {"split": "Main/train", "images": 2, "evaluated_split": True}


# ------------------------------------------------------------------------------------- a new rule, one file
def test_a_new_rule_is_one_registration_and_every_role_can_use_it():
    """What a new rule module does (register a ThresholdRule subclass); configs then name it by `kind`."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Midrange(ThresholdRule):
        name: str = "midrange_test"
        weight: float = 0.5

        def _cutoff(self, values):
            low, high = values.amin(dim=-1), values.amax(dim=-1)
            return low + self.weight * (high - low)

    THRESHOLD_RULES.register("midrange_test", config=Midrange)(Midrange)
    try:
        rule = build_rule({"kind": "midrange_test", "weight": 0.25}, "threshold.peaks")
        assert rule.cutoff(VALUES).item() == 1.0 + 0.25 * 9.0
        thr = Thresholds.from_config({"classes": {"kind": "midrange_test"}, "peaks": "midrange_test"})
        assert select_classes(torch.tensor([[0.0, 4.0, 10.0]]), thr).tolist() == [[False, False, True]]
        assert peak_filter_value(torch.tensor([[[[0.0, 4.0], [2.0, 8.0]]]]), "midrange_test").item() == 4.0
    finally:
        THRESHOLD_RULES.unregister("midrange_test")


def test_a_registered_toy_rule_is_chosen_by_kind_in_a_composed_config_and_reaches_metrics_json(voc_root, tmp_path):
    """End to end: a rule registered by a module is named on the command line, and a short run's instance
    metrics show its effect (a cut-off above every peak: no peak, no instance)."""
    import json
    from dataclasses import dataclass

    from ranprm.cli.config import compose
    from ranprm.train import train
    from tests.test_train import tiny_overrides

    @dataclass(frozen=True)
    class AboveMax(ThresholdRule):
        name: str = "above_max_test"
        margin: float = 0.0

        def _cutoff(self, values):
            seen.append(values.shape[-1])
            return values.amax(dim=-1) + self.margin

    seen: list[int] = []
    THRESHOLD_RULES.register("above_max_test", config=AboveMax)(AboveMax)
    try:
        rule = ["threshold=mean", "threshold.peaks.kind=above_max_test", "+threshold.peaks.margin=1.0"]
        everything = ["threshold.classes.kind=none", "threshold.min_class_prob=0"]
        train(compose("train", tiny_overrides(voc_root, tmp_path) + rule + everything))
        summary = json.loads((tmp_path / "metrics.json").read_text())
        assert seen and max(seen) > 0  # called on each valid class's peak values
        instances = summary["instance_metrics"]
        assert instances["num_images"] == 2 and instances.get("num_peaks", 0) == 0
        assert instances["num_predictions"] == 0
    finally:
        THRESHOLD_RULES.unregister("above_max_test")
