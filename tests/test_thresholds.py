import pytest
import torch

from ranprm.errors import ConfigError
from ranprm.prm.thresholds import Thresholds, ThresholdStrategy, select_classes, select_peaks

VALUES = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])


@pytest.mark.parametrize(
    ("strategy", "cutoff", "valid"),
    [
        (ThresholdStrategy("fixed", value=3.5), 3.5, [4.0, 10.0]),
        (ThresholdStrategy("mean"), 4.0, [4.0, 10.0]),
        (ThresholdStrategy("median"), 3.0, [3.0, 4.0, 10.0]),
        (ThresholdStrategy("quantile", q=0.75), 4.0, [4.0, 10.0]),
        (ThresholdStrategy("quantile", q=0.6), 3.4, [4.0, 10.0]),
    ],
)
def test_strategies_known_cutoffs(strategy, cutoff, valid):
    assert strategy.cutoff(VALUES).item() == pytest.approx(cutoff)
    assert VALUES[select_peaks(VALUES, strategy)].tolist() == valid


def test_median_of_even_count_averages_the_middle_pair():
    assert ThresholdStrategy("median").cutoff(torch.tensor([1.0, 2.0, 3.0, 10.0])).item() == 2.5


def test_empty_candidates_select_nothing():
    assert ThresholdStrategy("mean").cutoff(torch.zeros(0)).item() == float("inf")
    assert select_peaks(torch.zeros(0), ThresholdStrategy("quantile")).numel() == 0


def test_class_selection_and_negative_image():
    thr = Thresholds(ThresholdStrategy("mean"), ThresholdStrategy("mean"), min_class_prob=0.5)
    scores = torch.tensor([[3.0, -2.0, 1.0, -6.0], [-3.0, -4.0, -5.0, -6.0]])
    # image 0: mean -1 -> classes 0 and 2 (both prob > 0.5); image 1: relative rule keeps 0 and 1, floor drops them
    assert select_classes(scores, thr).tolist() == [[True, False, True, False], [False, False, False, False]]
    fixed = Thresholds(ThresholdStrategy("fixed", value=0.0), ThresholdStrategy("fixed", value=30.0))
    assert select_classes(scores, fixed).tolist() == [[True, False, True, False], [False] * 4]


def test_bad_strategy_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown"):
        ThresholdStrategy("third_quartile")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="q=1.5"):
        ThresholdStrategy("quantile", q=1.5)
    with pytest.raises(ConfigError, match="classes.kind"):
        Thresholds.from_config({"peaks": {"kind": "mean"}})
