"""Structured configs (ranprm.cli.schema): a wrong type or an unknown key is one line naming the key and the type it
must have, at compose time; `???` values are one line naming each; each entry point's `--help` is its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ranprm.cli.config import check_composed, compose, config_dir
from ranprm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PREDICT_ARGS = ["ckpt=a.ckpt", "input=photos", "output=out"]


@pytest.mark.parametrize(
    ("config", "override", "line"),
    [
        ("train", "optimizer.lr=abc", "optimizer.lr='abc' must be a number"),
        ("train", "data.batch_size=x", "data.batch_size='x' must be an integer"),
        ("train", "head.window=1.5", "head.window=1.5 must be an integer"),
        ("train", "prm.mode=3", "prm.mode=3 must be one of probability, gradient"),
        ("train", "prm.precision=fp16", "prm.precision='fp16' must be one of fp32, bf16"),
        ("train", "seed=abc", "seed='abc' must be an integer"),
        ("train", "overwrite=maybe", "overwrite='maybe' must be true or false"),
        ("train", "trainer.max_epochs=x", "trainer.max_epochs='x' must be an integer or null"),
        ("train", "callbacks.checkpoint.mode=up", "callbacks.checkpoint.mode='up' must be one of min, max"),
        ("train", "data.synthetic.num_train=many", "data.synthetic.num_train='many' must be an integer"),
        ("train", "eval.metrics=abc", "eval.metrics='abc' must be a list of strings or null"),
        ("evaluate", "prm.mode=3", "prm.mode=3 must be one of probability, gradient or null"),
        ("evaluate", "calibration.max_images=all", "calibration.max_images='all' must be an integer or null"),
        ("predict", "on_bad_image=maybe", "on_bad_image='maybe' must be one of skip, stop"),
        ("predict", "image_size=abc", "image_size='abc' must be an integer or null"),
    ],
)
def test_a_value_of_the_wrong_type_is_one_line_naming_the_key_and_the_type(config, override, line):
    extra = PREDICT_ARGS if config == "predict" else []
    with pytest.raises(ConfigError) as caught:
        compose(config, [*extra, override])
    assert str(caught.value) == line


@pytest.mark.parametrize(
    ("config", "override", "start"),
    [
        ("train", "data.bogus=1", "data.bogus is not an option of data; its options: name, root, class_names,"),
        ("train", "+data.bogus=1", "data.bogus is not an option of data; its options: name, root, class_names,"),
        ("train", "+head.sizes=[1]", "head.sizes is not an option of head; its options: stimulation, window,"),
        ("train", "callbacks.panels.dpi=3", "callbacks.panels.dpi is not an option of callbacks.panels; its options:"),
        ("evaluate", "eval.every_n_epochs=2", "eval.every_n_epochs is not an option of eval"),  # a train-only key
        ("predict", "+prm.speed=9", "prm.speed is not an option of prm; its options: mode, sub_pixel_factor,"),
        ("train", "backbone=nope", "In 'train': Could not find 'backbone/nope'; the options of 'backbone': "),
    ],
)
def test_an_unknown_key_or_option_is_one_line_with_the_choices(config, override, start):
    extra = PREDICT_ARGS if config == "predict" else []
    with pytest.raises(ConfigError) as caught:
        compose(config, [*extra, override])
    assert str(caught.value).startswith(start) and "\n" not in str(caught.value)


def test_free_form_sections_still_take_new_keys():
    """trainer.* takes any Lightning Trainer argument and optimizer.* any keyword of the torch optimizer."""
    cfg = compose("train", ["+trainer.max_time=00:00:05:00", "+optimizer.betas=[0.9,0.99]", "optimizer.lr=0.5"])
    assert cfg.trainer.max_time == "00:00:05:00" and list(cfg.optimizer.betas) == [0.9, 0.99]
    assert cfg.optimizer.lr == 0.5 and isinstance(cfg.optimizer.lr, float)


def test_choices_reach_the_code_as_plain_strings():
    from ranprm.cli.config import to_plain

    cfg = compose("train", ["prm.mode=gradient", "callbacks.progress_bar=none"])
    assert cfg.callbacks.progress_bar == "none"  # the enum compares equal to its string
    assert to_plain(cfg.prm)["mode"] == "gradient" and type(to_plain(cfg.prm)["mode"]) is str


def test_every_config_composes():
    """Each entry point, and each experiment preset of train, composes against its schema."""
    for experiment in sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml")):
        assert compose("train", [f"experiment={experiment}"]).task_name == "train"
    assert compose("evaluate", ["ckpt=a.ckpt"]).ckpt == "a.ckpt"
    assert compose("predict", PREDICT_ARGS).output == "out"


def test_missing_required_values_are_named_in_one_line_with_an_example():
    with pytest.raises(ConfigError) as caught:
        check_composed(compose("predict", ["ckpt=a.ckpt"]), "predict")
    assert str(caught.value) == (
        "input and output are required; give input=... output=..., e.g. "
        "`ranprm-predict ckpt=outputs/train/<date>/<time>/checkpoints/last.ckpt input=photos/ output=predicted/`"
    )
    check_composed(compose("predict", PREDICT_ARGS), "predict")  # nothing missing: nothing raised


def _run(entry: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    environ.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", entry, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=240
    )


@pytest.mark.parametrize(
    ("entry", "args", "line"),
    [
        ("ranprm.train", ["optimizer.lr=abc"], "ranprm: error: optimizer.lr='abc' must be a number"),
        ("ranprm.train", ["data.batch_size=x"], "ranprm: error: data.batch_size='x' must be an integer"),
        # a logger's setting in the spelling of one logger per run, which Hydra refuses while composing
        ("ranprm.train", ["logger=wandb", "logger.project=mine"], "ranprm: error: logger.project is not an option of "
         "logger; each logger's settings are under its name: logger.wandb.project=..."),
        ("ranprm.predict", [], "ranprm: error: ckpt, input and output are required; give ckpt=... input=... "
         "output=..., e.g. `ranprm-predict ckpt=outputs/train/<date>/<time>/checkpoints/last.ckpt input=photos/ "
         "output=predicted/`"),
        ("ranprm.evaluate", ["--help", "data.batch_size=x"], "ranprm: error: data.batch_size='x' must be an integer"),
    ],
)  # fmt: skip
def test_the_console_commands_print_one_line_and_exit_2_before_anything_is_made(tmp_path, entry, args, line):
    run_dir = tmp_path / "run"
    proc = _run(entry, [*args, f"hydra.run.dir={run_dir}"] if entry == "ranprm.train" else args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == line and proc.stdout == ""
    assert not run_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder, no log


@pytest.mark.parametrize(
    ("entry", "example", "groups", "foreign"),
    [
        ("ranprm.train", "ranprm-train experiment=seed_voc", ["optimizer:", "debug:", "backbone:"], ["predictions:"]),
        ("ranprm.evaluate", "ranprm-evaluate predictions=predictions/predictions.json data=voc",
         ["data:", "threshold:", "retrieval:", "predictions: null"], ["optimizer", "debug", "backbone:", "max_epochs"]),
        ("ranprm.predict", "ranprm-predict ckpt=outputs/train/<date>/<time>/checkpoints/last.ckpt input=photos/",
         ["threshold:", "retrieval:", "on_bad_image: skip"],
         ["optimizer", "debug", "backbone:", "data:", "max_epochs"]),
    ],
)  # fmt: skip
def test_help_lists_only_the_entry_points_own_options_with_examples(tmp_path, entry, example, groups, foreign):
    proc = _run(entry, ["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert example in proc.stdout
    for text in groups:
        assert text in proc.stdout, text
    for text in foreign:
        assert text not in proc.stdout, text


SWA = "+callbacks.extra.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging"


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["+callbacks.extra.swa._target_=lightning.pytorch.callbacks.NoSuchCallback"],
         "callbacks.extra.swa._target_=lightning.pytorch.callbacks.NoSuchCallback: lightning.pytorch.callbacks has no "
         "NoSuchCallback"),
        (["+callbacks.extra.swa._target_=no_such_package.Thing"],
         "callbacks.extra.swa._target_=no_such_package.Thing is not importable; give a full class path, e.g. "
         "lightning.pytorch.callbacks.StochasticWeightAveraging"),
        ([SWA, "+callbacks.extra.swa.swa_lr=0.01"],
         "callbacks.extra.swa.swa_lr is not an argument of lightning.pytorch.callbacks.StochasticWeightAveraging; its "
         "arguments: swa_lrs, swa_epoch_start, annealing_epochs, annealing_strategy, avg_fn, device"),
        ([SWA], "callbacks.extra.swa: lightning.pytorch.callbacks.StochasticWeightAveraging missing a required "
                "argument: 'swa_lrs'; give it as +callbacks.extra.swa.<argument>=..."),
        (["+callbacks.extra.swa._target_=collections.OrderedDict"],
         "callbacks.extra.swa._target_=collections.OrderedDict is not a lightning.pytorch.callbacks.callback.Callback"),
        (["+callbacks.extra.swa.swa_lrs=0.01"], "callbacks.extra.swa needs a _target_ naming its class, e.g. "
         "+callbacks.extra.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging"),
    ],
)  # fmt: skip
def test_an_extra_callback_is_checked_at_compose_time_in_one_line(overrides, line):
    with pytest.raises(ConfigError) as caught:
        check_composed(compose("train", overrides), "train", require_all=False)
    assert str(caught.value) == line


def test_an_extra_callback_by_target_joins_the_run(tmp_path):
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    from ranprm.cli.build import build_callbacks

    cfg = compose("train", [SWA, "+callbacks.extra.swa.swa_lrs=0.01", "+callbacks.extra.swa.swa_epoch_start=3"])
    check_composed(cfg, "train", require_all=False)  # nothing raised
    (swa,) = [c for c in build_callbacks(cfg, tmp_path, has_logger=False) if isinstance(c, StochasticWeightAveraging)]
    assert swa._swa_lrs == 0.01 and swa._swa_epoch_start == 3


def test_cfg_job_runs_the_checks_a_run_makes(tmp_path):
    """`--cfg job` prints only a config a run would accept: an extra callback's bad key or `+logger.bogus` is the
    run's one line and exit 2; a good one is printed, and nothing is made in the folder."""
    proc = _run("ranprm.train", ["--cfg", "job", SWA, "+callbacks.extra.swa.swa_lr=0.01"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith("ranprm: error: callbacks.extra.swa.swa_lr is not an argument of ")
    proc = _run("ranprm.train", ["--cfg", "job", "+logger.bogus=1"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("ranprm: error: logger.bogus is not an option")
    proc = _run("ranprm.train", ["--cfg", "job", SWA, "+callbacks.extra.swa.swa_lrs=0.01"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "_target_: lightning.pytorch.callbacks.StochasticWeightAveraging" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []
