"""The per-class reading of the RAN-PRM paper's Q3 (threshold=class_q3): calibrated at the end of training, stored
in the checkpoint, reloaded for inference, and recomputed by ranprm-evaluate on a split the user names."""

import json
from pathlib import Path

import pytest
import torch

from ranprm.cli.config import compose
from ranprm.errors import ConfigError
from ranprm.evaluate import evaluate
from ranprm.lightning.checkpoint import load_module
from ranprm.train import train
from tests.helpers import CLASSES
from tests.test_train import tiny_overrides


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny run with threshold=class_q3 and 2 of its 6 training images held out; (VOC root, run folder)."""
    from tests.helpers import write_voc

    root = write_voc(tmp_path_factory.mktemp("voc") / "VOC2012")
    out = tmp_path_factory.mktemp("run")
    train(compose("train", tiny_overrides(root, out) + ["threshold=class_q3", "data.holdout_fraction=0.34"]))
    return root, out


def test_training_stores_the_held_out_class_scores_and_inference_reloads_them(calibrated_run):
    root, out = calibrated_run
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["class_calibration"] == {"split": "held-out 0.34 of Main/train", "images": 2,
                                            "evaluated_split": False}  # fmt: skip
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    scores = ckpt["class_calibration"]["scores"]
    assert scores.shape == (2, len(CLASSES))
    module = load_module(out / "checkpoints" / "last.ckpt", CLASSES)
    assert torch.equal(module.class_calibration.scores, scores)
    # Q3 of two values a <= b by linear interpolation: a + 0.75 * (b - a), per class.
    low, high = scores.min(0).values, scores.max(0).values
    expected = (low + 0.75 * (high - low)).tolist()
    assert module.inference_config().thresholds.class_cutoffs == pytest.approx(expected)
    # The stored scores are the class test's, recomputed the way inference computes them.
    from ranprm.cli.config import to_plain
    from ranprm.data.datamodule import DataConfig, VOCDataModule

    data = VOCDataModule(DataConfig.from_config(to_plain(compose("train", tiny_overrides(root, out) +
                                                                  ["data.holdout_fraction=0.34"]).data)))  # fmt: skip
    data.setup("fit")
    again = module.calibration_scores(data.val_dataloader())
    torch.testing.assert_close(again, scores, rtol=1e-5, atol=1e-5)


def evaluate_cfg(root: Path, ckpt: Path, out: Path, *extra: str):
    return compose("evaluate", ["data=voc", f"data.root={root}", f"data.class_names=[{','.join(CLASSES)}]",
                                "data.image_size=64", "data.num_workers=0", f"ckpt={ckpt}", f"output={out}",
                                "device=cpu", *extra])  # fmt: skip


def test_evaluate_recomputes_the_calibration_on_a_named_split(calibrated_run, tmp_path):
    root, run = calibrated_run
    ckpt = run / "checkpoints" / "last.ckpt"
    record = evaluate(evaluate_cfg(root, ckpt, tmp_path / "a", "calibration.split=train"))
    assert record["class_calibration"] == {"split": "Main/train", "images": 6, "evaluated_split": False}
    record = evaluate(evaluate_cfg(root, ckpt, tmp_path / "b"))  # the checkpoint's own calibration
    assert record["class_calibration"]["split"] == "held-out 0.34 of Main/train"
    on_val = ["calibration.split=val", "calibration.task=Segmentation"]
    record = evaluate(evaluate_cfg(root, ckpt, tmp_path / "c", *on_val))
    assert record["class_calibration"] == {"split": "Segmentation/val", "images": 2, "evaluated_split": True}


def test_a_checkpoint_without_calibration_is_a_one_line_error_before_evaluating(calibrated_run, tmp_path):
    root, run = calibrated_run
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["class_calibration"]
    bare = tmp_path / "bare.ckpt"
    torch.save(ckpt, bare)
    with pytest.raises(ConfigError, match="needs a class calibration .* calibration.split=train"):
        evaluate(evaluate_cfg(root, bare, tmp_path / "out"))
    assert not (tmp_path / "out" / "metrics.json").exists()
