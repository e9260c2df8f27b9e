"""`ranprm-evaluate` and `ranprm-predict` through Lightning's Trainer: the same numbers as a plain loop over the
images, the same metrics from two DDP processes (gloo on CPU) as from one, the device/trainer settings, progress
bars, and one line for a missing required value (issue 17 item 4, issue 18 item 6)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from ranprm.cli.config import compose, to_plain
from ranprm.cli.inference import inference_trainer_arguments, load_for_inference
from ranprm.data.datamodule import DataConfig, VOCDataModule
from ranprm.errors import ConfigError
from ranprm.eval import EvalConfig, EvaluatorSuite, eval_inputs, write_results
from ranprm.evaluate import evaluate
from ranprm.predict import predict
from tests.test_evaluate import _data, _gt_results
from tests.test_predict import EVERYTHING, _predict_cfg, tiny_model  # noqa: F401  (the module-scoped fixture)

ENV = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _without_time(record: dict) -> dict:
    return {k: v for k, v in json.loads(json.dumps(record)).items() if k != "wall_s"}


def _hand_loop(cfg: DictConfig) -> dict:
    """What `ranprm-evaluate ckpt=` computed before the Trainer ran it: every batch of the evaluated images through
    `predict_images` into the evaluators, in one process."""
    datamodule = VOCDataModule(DataConfig.from_config(to_plain(cfg.data)))
    ids = datamodule.split_ids()[1]
    module = load_for_inference(cfg, torch.device("cpu"), datamodule.class_names)
    suite = EvaluatorSuite(datamodule.class_names, EvalConfig.from_config(to_plain(cfg.eval)))
    datamodule.val_set = datamodule._dataset(ids, train=False)
    for batch in datamodule.val_dataloader():
        keep = [i for i, t in enumerate(batch.get("targets", [])) if t is not None]
        if keep:
            predictions = module.predict_images(batch["image"][keep], [batch["orig_size"][i] for i in keep],
                                                [batch["raw_image"][i] for i in keep])  # fmt: skip
            suite.update(*eval_inputs(batch, datamodule.class_names, predictions=predictions, keep=keep))
    return json.loads(json.dumps(suite.compute().to_record()))


def _five_val_images(voc: Path, root: Path) -> Path:
    """A copy of the tiny VOC whose val split holds 5 images: odd, so two processes' sampler repeats one."""
    copy = root / "VOC2012"
    shutil.copytree(voc, copy)
    ids = sorted(p.stem for p in (copy / "JPEGImages").glob("*.jpg"))[:5]
    (copy / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return copy


def test_trainer_gives_the_numbers_of_the_plain_loop(tiny_model, tmp_path):  # noqa: F811
    voc, ckpt = tiny_model
    voc = _five_val_images(voc, tmp_path)
    cfg = compose("evaluate", [*_data(voc), "data.batch_size=2", f"ckpt={ckpt}", f"output={tmp_path / 'o'}",
                               "progress_bar=none", *EVERYTHING])  # fmt: skip
    record = evaluate(cfg)
    expected = _hand_loop(cfg)
    assert expected["num_images"] == 5 and record["skipped_images"] == 0
    assert {k: record[k] for k in expected} == expected  # every metric, count and per-class value, exactly
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["map_r_50"] == expected["map_r_50"]


# two processes started from the command line: about 22 s on 2 shared cores, so not marked slow
def test_two_ddp_processes_give_the_metrics_of_one(tiny_model, tmp_path):  # noqa: F811
    voc, ckpt = tiny_model
    voc = _five_val_images(voc, tmp_path)
    common = [*_data(voc), "data.batch_size=2", f"ckpt={ckpt}", *EVERYTHING, "progress_bar=none"]
    one = evaluate(compose("evaluate", [*common, f"output={tmp_path / 'one'}"]))
    proc = subprocess.run(
        [sys.executable, "-m", "ranprm.evaluate", *common, f"output={tmp_path / 'ddp'}", "trainer.accelerator=cpu",
         "trainer.devices=2", "trainer.strategy=ddp", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr  # it really ran two
    two = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert two["num_images"] == 5 == one["num_images"]  # the image the sampler repeated counts once
    assert _without_time(two) == _without_time(one)
    assert proc.stdout.count("wrote ") == 1  # only the first process writes and prints


def test_device_is_the_one_device_shorthand_and_trainer_settings_are_checked(tmp_path):
    def args(*overrides: str) -> dict:
        return inference_trainer_arguments(compose("evaluate", list(overrides)))

    assert args("device=cpu") == {"accelerator": "cpu", "devices": 1, "strategy": "auto", "num_nodes": 1,
                                  "precision": "32-true"}  # fmt: skip
    if not torch.cuda.is_available():  # device=auto: CUDA when there is one, else the CPU (as before the Trainer)
        assert args() == args("device=cpu")
    assert args("trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp")["devices"] == 2
    with pytest.raises(ConfigError, match="device=cpu and trainer.accelerator/trainer.devices both"):
        args("device=cpu", "trainer.devices=2")
    with pytest.raises(ConfigError, match="trainer.strategy=ddp_spawn: .* use trainer.strategy=ddp"):
        args("trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn")
    with pytest.raises(ConfigError, match="trainer.devices=0 must be at least 1"):
        args("trainer.devices=0")
    with pytest.raises(ConfigError, match=r"trainer.precision is not a setting of this command.*prm.precision"):
        args("+trainer.precision=bf16-mixed")
    with pytest.raises(ConfigError, match="progress_bar='bar' must be one of rich, tqdm, none"):
        evaluate(compose("evaluate", ["ckpt=x.ckpt", "progress_bar=bar", f"output={tmp_path}"]))
    assert not (tmp_path / "metrics.json").exists()


def test_predict_runs_on_the_trainer_with_a_progress_bar(tiny_model, tmp_path, capfd):  # noqa: F811
    voc, ckpt = tiny_model
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        shutil.copy(voc / "JPEGImages" / f"2024_00000{i}.jpg", inp / f"im{i}.jpg")
    one = predict(_predict_cfg(ckpt, inp, tmp_path / "one", "progress_bar=none"))
    capfd.readouterr()
    batched = predict(_predict_cfg(ckpt, inp, tmp_path / "two", "batch_size=2", "progress_bar=tqdm"))
    shown = "".join(capfd.readouterr())  # Lightning's tqdm bar draws on stdout
    assert "Predicting DataLoader 0: 100%" in shown and "2/2 [" in shown  # tqdm: done/total [elapsed<remaining]
    # a batch of two gives the same instances as images one by one (each image's own size and peaks)
    assert [e["image_id"] for e in batched] == [e["image_id"] for e in one]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["im0.png", "im1.png", "im2.png", "predictions.json"]


def test_evaluating_a_results_file_shows_progress(voc_root, tmp_path, capfd):
    write_results(tmp_path / "gt.json", _gt_results(voc_root))
    evaluate(compose("evaluate", [*_data(voc_root), f"predictions={tmp_path / 'gt.json'}", f"output={tmp_path}"]))
    err = capfd.readouterr().err
    assert "evaluating: 100%" in err and "2/2 [" in err  # tqdm: done/total [elapsed<remaining]


@pytest.mark.parametrize(
    ("command", "args", "line"),
    [
        # the schema's check at compose time (ranprm.cli.config), with the command's example (ranprm.cli.help)
        ("ranprm.predict", [], "ckpt, input and output are required; give ckpt=... input=... output=..."),
        ("ranprm.predict", ["ckpt=x.ckpt", "output=o"], "input is required; give input=..."),
        ("ranprm.evaluate", [], "give exactly one of ckpt=PATH (run a model) and predictions=FILE"),
    ],
)
def test_a_missing_required_value_is_one_line_with_an_example(tmp_path, command, args, line):
    proc = subprocess.run([sys.executable, "-m", command, *args, f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=ENV, timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ranprm: error:"), proc.stderr
    assert line in lines[0] and "e.g." in lines[0] and f"ranprm-{command.split('.')[1]} " in lines[0]


@pytest.mark.slow  # two 2-process runs from the command line (about 30 s on 2 shared cores)
def test_two_ddp_processes_predict_what_one_does_and_a_stop_is_one_line(tiny_model, tmp_path):  # noqa: F811
    voc, ckpt = tiny_model
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(5):  # odd: the processes get 3 and 2 images (Lightning's predict sampler repeats none)
        shutil.copy(voc / "JPEGImages" / f"2024_00000{i}.jpg", inp / f"im{i}.jpg")
    (inp / "im5.jpg").write_bytes(b"not an image")
    torch.set_num_threads(1)  # as each DDP process (OMP_NUM_THREADS=1): the same float sums, so the same scores
    one = predict(_predict_cfg(ckpt, inp, tmp_path / "one", "progress_bar=none"))
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "progress_bar=none"]

    def cli(out: str, *extra: str) -> subprocess.CompletedProcess:
        args = [f"ckpt={ckpt}", f"input={inp}", f"output={tmp_path / out}", "image_size=64", *EVERYTHING, *ddp]
        return subprocess.run([sys.executable, "-m", "ranprm.predict", *args, *extra], capture_output=True,
                              text=True, env=ENV, timeout=300, cwd=tmp_path)  # fmt: skip

    skip = cli("two")
    assert skip.returncode == 0, skip.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "predictions.json").read_text()) == json.loads(json.dumps(one))
    shown = skip.stdout + skip.stderr  # predict logs to the console (stdout)
    assert shown.count("wrote 5 overlay(s)") == 1 and shown.count("skipped 1 unreadable image(s)") == 1
    stop = cli("stop", "on_bad_image=stop")
    assert stop.returncode == 2
    errors = [line for line in stop.stderr.splitlines() if line.startswith("ranprm: error:")]
    assert len(errors) == 1 and "im5.jpg" in errors[0] and "Traceback" not in stop.stderr, stop.stderr[-3000:]
    assert not (tmp_path / "stop" / "predictions.json").exists()


def test_track_yields_every_item_whatever_the_bar(capfd):
    from ranprm.utils.progress import track

    for bar in ("tqdm", "rich", "none"):
        assert list(track(iter([3, 1, 2]), 3, "evaluating", bar, "image")) == [3, 1, 2]
    shown = "".join(capfd.readouterr())
    assert "evaluating: 100%" in shown and "3/3 [" in shown  # tqdm: done/total [elapsed<remaining, rate]
    with pytest.raises(ValueError, match="choose one of rich, tqdm, none"):
        list(track([1], 1, "x", "bars"))
