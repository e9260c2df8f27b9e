"""lightning-hydra-template habits: debug= presets, the local config, paths.data_dir, the config tree, common Trainer
keys without `+`, trainer=mps, the per-step LR monitor, EarlyStopping and EMA from config. Each does what it says."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import SimpleProfiler

import ranprm.train as train_mod
from ranprm.cli.config import compose, to_plain
from ranprm.cli.print_config import config_tree_order, print_config_tree
from ranprm.lightning.loggers import enabled_loggers
from ranprm.train import train
from tests.test_train import tiny_overrides


@pytest.fixture
def trainers(monkeypatch) -> list[L.Trainer]:
    """The Trainers `train()` builds, to inspect after the run."""
    built: list[L.Trainer] = []
    original = train_mod.build_trainer

    def recording(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train_mod, "build_trainer", recording)
    return built


def extra_callback(monkeypatch, callback: Callback) -> None:
    """Run `callback` in `train()` after the configured ones."""
    original = train_mod.build_callbacks
    monkeypatch.setattr(train_mod, "build_callbacks", lambda *a, **k: [*original(*a, **k), callback])


def _metrics_csv(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def _without(overrides: list[str], *prefixes: str) -> list[str]:
    return [o for o in overrides if not o.startswith(prefixes)]


# --------------------------------------------------------------------------------------------------- debug=


@pytest.mark.parametrize("preset", ["fast_dev_run", "overfit", "profiler", "detect_anomaly"])
def test_every_debug_preset_reads_data_in_process_and_skips_wandb(preset):
    cfg = compose("train", [f"debug={preset}", "paths.output_dir=/tmp/x"])
    assert cfg.data.num_workers == 0 and cfg.data.persistent_workers is False
    assert enabled_loggers(to_plain(cfg.logger)) == ["csv"]  # not W&B
    assert cfg.task_name == "debug"  # runs land under outputs/debug/


def test_fast_dev_run_runs_one_batch_and_saves_nothing(voc_root, tmp_path, trainers):
    train(compose("train", [*tiny_overrides(voc_root, tmp_path), "debug=fast_dev_run"]))
    (trainer,) = trainers
    assert trainer.fast_dev_run is True
    assert trainer.global_step == 1  # one training batch (6 images would be 2 batches of 4 an epoch, for 2 epochs)
    assert not list((tmp_path / "checkpoints").glob("*.ckpt")) if (tmp_path / "checkpoints").exists() else True


def test_overfit_drives_the_training_loss_down(voc_root, tmp_path, trainers):
    overrides = [*_without(tiny_overrides(voc_root, tmp_path), "trainer.max_epochs"), "debug=overfit",
                 "trainer.log_every_n_steps=1"]  # fmt: skip
    train(compose("train", overrides))
    (trainer,) = trainers
    assert trainer.overfit_batches == 2 and trainer.max_epochs == 20
    assert trainer.global_step == 40  # the same 2 batches, 20 epochs
    losses = [float(r["train/loss"]) for r in _metrics_csv(tmp_path) if r.get("train/loss")]
    assert len(losses) == 40
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses


def test_profiler_reports_the_time_of_each_hook(voc_root, tmp_path, trainers):
    train(compose("train", [*_without(tiny_overrides(voc_root, tmp_path), "trainer.max_epochs"), "debug=profiler"]))
    (trainer,) = trainers
    assert isinstance(trainer.profiler, SimpleProfiler)
    assert trainer.max_epochs == 1
    recorded = trainer.profiler.recorded_durations
    assert recorded["run_training_epoch"] and any("training_step" in k for k in recorded)


def test_detect_anomaly_runs_training_in_autograd_anomaly_mode(voc_root, tmp_path, trainers, monkeypatch):
    seen: list[bool] = []

    class Probe(Callback):
        def on_train_batch_end(self, *args, **kwargs):
            seen.append(torch.is_anomaly_enabled())

    extra_callback(monkeypatch, Probe())
    train(compose("train", [*tiny_overrides(voc_root, tmp_path), "debug=detect_anomaly"]))
    assert seen and all(seen)
    assert not torch.is_anomaly_enabled()  # switched off again after fit


# --------------------------------------------------------------------------------------- local config, paths


def test_voc_root_comes_from_paths_data_dir(monkeypatch):
    monkeypatch.delenv("RANPRM_DATA_DIR", raising=False)
    cfg = compose("train", ["data=voc", "paths.output_dir=/tmp/x"])
    assert cfg.data.root == "data/VOCdevkit/VOC2012"
    cfg = compose("train", ["data=voc", "paths.data_dir=/datasets", "paths.output_dir=/tmp/x"])
    assert cfg.data.root == "/datasets/VOCdevkit/VOC2012"
    monkeypatch.setenv("RANPRM_DATA_DIR", "/scratch/me")
    assert compose("train", ["data=voc", "paths.output_dir=/x"]).data.root == "/scratch/me/VOCdevkit/VOC2012"
    # data.root still wins when given
    assert compose("train", ["data=voc", "data.root=/v/VOC2012", "paths.output_dir=/x"]).data.root == "/v/VOC2012"


def test_a_local_config_is_optional_and_applied_after_the_presets(tmp_path):
    """`local/default.yaml` on the search path (conf/local/ in a checkout, --config-dir for an installed wheel)."""
    assert "local" not in compose("train", ["paths.output_dir=/x"])  # none here: composing still works
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "default.yaml").write_text(
        "# @package _global_\npaths:\n  data_dir: /datasets\ndata:\n  num_workers: 7\n"
    )
    overrides = [f"hydra.searchpath=[file://{tmp_path}]", "data=voc", "experiment=smoke", "paths.output_dir=/x"]
    cfg = compose("train", overrides)
    assert cfg.data.root == "/datasets/VOCdevkit/VOC2012"
    assert cfg.data.num_workers == 7  # after experiment=smoke, which sets 0
    assert compose("train", [*overrides, "data.num_workers=3"]).data.num_workers == 3  # the command line wins


def test_local_configs_are_ignored_by_git_and_left_out_of_the_wheel():
    root = Path(__file__).resolve().parents[1]
    assert "/conf/local/*.yaml" in (root / ".gitignore").read_text().splitlines()
    import tomllib

    excluded = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["exclude-package-data"]
    assert excluded["ranprm.conf"] == ["local/*.yaml"]


# ------------------------------------------------------------------------------------------------ config tree


def test_config_tree_lists_the_groups_in_data_order_with_resolved_values():
    cfg = compose("train", ["data=voc", "paths.data_dir=/datasets", "paths.output_dir=/runs/a", "tags=[x]"])
    order = config_tree_order(cfg)
    assert order[:3] == ["data", "backbone", "head"] and "hydra" not in order
    out = io.StringIO()
    print_config_tree(cfg, file=out)
    text = out.getvalue()
    assert "root: /datasets/VOCdevkit/VOC2012" in text  # resolved, not ${paths.data_dir}/...
    assert text.index("data") < text.index("backbone") < text.index("trainer") < text.index("paths")
    assert "optimized_metric: val/cls_map" in text and "- x" in text  # top-level keys in the `run` branch


def test_train_prints_the_tree_unless_told_not_to(voc_root, tmp_path, capsys):
    overrides = [*tiny_overrides(voc_root, tmp_path), "trainer.max_epochs=1", "callbacks.panels.num_images=0"]
    train(compose("train", [*overrides, "print_config=false"]))
    assert "optimized_metric:" not in capsys.readouterr().out
    train(compose("train", [*overrides, f"paths.output_dir={tmp_path / 'b'}"]))
    assert "optimized_metric:" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- Trainer keys


def test_trainer_mps_composes():
    cfg = compose("train", ["trainer=mps", "paths.output_dir=/x"])
    assert cfg.trainer.accelerator == "mps" and cfg.trainer.devices == 1
    assert cfg.trainer.inference_mode is False  # from trainer/default


def test_common_trainer_keys_need_no_plus(voc_root, tmp_path, trainers):
    overrides = [*tiny_overrides(voc_root, tmp_path), "trainer.accumulate_grad_batches=2",
                 "trainer.gradient_clip_val=0.5", "trainer.limit_val_batches=1"]  # fmt: skip
    train(compose("train", overrides))
    (trainer,) = trainers
    assert trainer.global_step == 2  # 2 batches an epoch, one optimizer step per 2 batches, 2 epochs
    assert trainer.gradient_clip_val == 0.5 and trainer.num_val_batches == [1]
    train(compose("train", [*tiny_overrides(voc_root, tmp_path / "b"), "trainer.limit_train_batches=1"]))
    assert trainers[1].global_step == 2  # 1 batch an epoch, 2 epochs


def test_learning_rate_is_logged_every_step(voc_root, tmp_path):
    """The cosine schedule steps per batch: the monitor shows each step's lr, lr * (1 + cos(pi * t / T)) / 2."""
    train(compose("train", [*tiny_overrides(voc_root, tmp_path), "trainer.log_every_n_steps=1"]))
    rows = [r for r in _metrics_csv(tmp_path) if r.get("lr-Adam/pg2")]  # pg1: the backbone, pg2: the head
    lrs = [float(r["lr-Adam/pg2"]) for r in rows]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]  # 4 optimizer steps
    assert lrs == pytest.approx([1e-3 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)])


# ------------------------------------------------------------------------------------- EarlyStopping and EMA


def test_early_stopping_stops_after_patience_epochs_without_improvement(voc_root, tmp_path, trainers):
    # min_delta 2: cls mAP (<= 1) can never improve by that much, so training stops once patience runs out
    overrides = [*tiny_overrides(voc_root, tmp_path), "trainer.max_epochs=6", "callbacks.early_stopping.enabled=true",
                 "callbacks.early_stopping.patience=2", "callbacks.early_stopping.min_delta=2.0"]  # fmt: skip
    train(compose("train", overrides))
    (trainer,) = trainers
    assert trainer.should_stop and trainer.current_epoch == 3  # epoch 0 sets the best, epochs 1 and 2 do not beat it
    assert json.loads((tmp_path / "metrics.json").read_text())["global_step"] == 6


def test_ema_weights_are_what_validation_and_checkpoints_use(voc_root, tmp_path, monkeypatch):
    """With updates starting past the last step, the average stays the initial weights: the checkpoint's
    state_dict must be exactly those, and the trained weights sit in current_model_state."""
    initial: dict[str, torch.Tensor] = {}

    class Snapshot(Callback):
        def on_fit_start(self, trainer, pl_module):
            initial.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    extra_callback(monkeypatch, Snapshot())
    overrides = [*tiny_overrides(voc_root, tmp_path), "callbacks.ema.enabled=true",
                 "callbacks.ema.update_starting_at_step=1000"]  # fmt: skip
    train(compose("train", overrides))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    weights = [k for k, v in initial.items() if v.is_floating_point()]
    assert all(torch.equal(ckpt["state_dict"][k], initial[k]) for k in weights)
    assert any(not torch.equal(ckpt["current_model_state"][k], initial[k]) for k in weights)


def test_ema_decay_must_be_between_0_and_1(voc_root, tmp_path):
    from ranprm.cli.build import build_callbacks
    from ranprm.errors import ConfigError

    cfg = compose(
        "train", [*tiny_overrides(voc_root, tmp_path), "callbacks.ema.enabled=true", "callbacks.ema.decay=1.5"]
    )
    with pytest.raises(ConfigError, match="callbacks.ema.decay=1.5"):
        build_callbacks(cfg, tmp_path, has_logger=False)
