"""A new metric is one new file: an evaluator registered by name reaches the training run's logged metrics, its
metrics.json, `ranprm-evaluate`'s metrics.json and the sweep summary, with no list to edit anywhere."""

from __future__ import annotations

import csv
import json
from typing import Any

import pytest

from ranprm.cli.config import compose
from ranprm.cli.sweep import write_summary
from ranprm.eval import EVALUATORS, Evaluation, Evaluator, GroundTruth, Prediction
from ranprm.evaluate import evaluate
from ranprm.train import train
from tests.test_evaluate import _data
from tests.test_train import tiny_overrides


class SegmentedImages(Evaluator):
    """A toy metric: the number of evaluated images that have instance masks."""

    def names(self) -> tuple[str, ...]:
        return ("toy_segmented",)

    def process(self, gt: GroundTruth, pred: Prediction) -> Any:
        return gt.instances is not None

    def reduce(self, records: list[Any]) -> Evaluation:
        return Evaluation({"toy_segmented": float(sum(records))}, summary=f"toy {sum(records)}")


@pytest.fixture
def toy_metric():
    EVALUATORS.register("toy_segmented")(SegmentedImages)
    yield "toy_segmented"
    EVALUATORS.unregister("toy_segmented")


def test_a_registered_evaluator_reaches_every_output(toy_metric, voc_root, tmp_path):
    run = tmp_path / "sweep" / "0"
    overrides = tiny_overrides(voc_root, run) + ["trainer.max_epochs=1", f"eval.metrics=[instance_ap,{toy_metric}]"]
    train(compose("train", overrides))
    summary = json.loads((run / "metrics.json").read_text())
    # the val split has 2 images, both segmented
    assert summary["metrics"]["val/toy_segmented"] == 2.0  # what the trainer logged
    assert summary["instance_metrics"]["toy_segmented"] == 2.0
    assert summary["instance_metrics"]["metric_names"] == ["map_r_25", "map_r_50", "map_r_75", "toy_segmented"]
    with next(run.rglob("metrics.csv")).open() as fh:
        assert "val/toy_segmented" in next(csv.reader(fh))  # the CSV logger's columns

    out = tmp_path / "evaluation"
    ckpt = run / "checkpoints" / "last.ckpt"
    evaluate(compose("evaluate", [*_data(voc_root), f"ckpt={ckpt}", f"output={out}", f"eval.metrics=[{toy_metric}]"]))
    written = json.loads((out / "metrics.json").read_text())
    assert written["toy_segmented"] == 2.0 and written["metric_names"] == ["toy_segmented"]

    write_summary(tmp_path / "sweep")
    with (tmp_path / "sweep" / "summary.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert float(row["instance/toy_segmented"]) == 2.0 and float(row["val/toy_segmented"]) == 2.0


def test_val_cls_map_leaves_out_a_class_without_positive_images(voc_root, tmp_path):
    """One cls_map definition: `cow` never appears, so it has no AP and stays out of the mean (torchmetrics' "macro"
    would count it as 0). The val split (2 images) always holds a square (AP 1) and one disk (AP 1 or 1/2), so the
    mean over the present classes is 0.75 or 1, and with cow as 0 it would be 0.5 or 0.67."""
    overrides = tiny_overrides(voc_root, tmp_path) + ["trainer.max_epochs=1", "data.class_names=[square,disk,cow]"]
    value = train(compose("train", overrides))
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert value in (pytest.approx(0.75), pytest.approx(1.0))
    assert summary["instance_metrics"]["cls_map"] == value  # the same number, on the last epoch
    assert summary["instance_metrics"]["per_class"]["cow"]["cls_ap"] is None
