"""Loggers: W&B offline without a key, images in the offline run, and no W&B failure ever stops training."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, WandbLogger

import ranprm.lightning.loggers as loggers_mod
import ranprm.train as train_mod
from ranprm.cli.config import compose
from ranprm.lightning.loggers import build_logger, wandb_has_credentials
from ranprm.train import train
from tests.test_train import tiny_overrides

VAL_IDS = ["2024_000006", "2024_000007"]


@pytest.fixture(autouse=True)
def _finish_wandb():
    """A run left open by one test would be reused by the next WandbLogger (Lightning takes `wandb.run`)."""
    yield
    import wandb

    wandb.finish()


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    """No API key anywhere: no environment variable, and a HOME with no ~/.netrc."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return home


def wandb_overrides(voc_root: Path, out: Path, epochs: int = 1) -> list[str]:
    return [
        *tiny_overrides(voc_root, out),
        f"trainer.max_epochs={epochs}",
        "logger=wandb",
        "callbacks.panels.num_images=2",
    ]


def test_no_credentials_without_env_or_netrc(no_wandb_key):
    assert not wandb_has_credentials()


def test_credentials_from_env(no_wandb_key, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_has_credentials()


def test_credentials_from_netrc(no_wandb_key):
    netrc = no_wandb_key / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_has_credentials()


def test_build_logger_falls_back_to_csv_when_wandb_init_raises(tmp_path, monkeypatch, caplog):
    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("no service")

    monkeypatch.setattr(loggers_mod, "SafeWandbLogger", Broken)
    with caplog.at_level(logging.WARNING, logger="ranprm.lightning.loggers"):
        logger = build_logger({"name": "wandb", "mode": "offline"}, tmp_path)
    assert isinstance(logger, CSVLogger)
    assert "W&B could not start (RuntimeError: no service)" in caplog.text


def test_build_logger_falls_back_to_csv_when_the_run_cannot_start(tmp_path, monkeypatch, caplog):
    class NoRun(loggers_mod.SafeWandbLogger):
        @property
        def experiment(self):
            raise OSError("wandb service did not start")

    monkeypatch.setattr(loggers_mod, "SafeWandbLogger", NoRun)
    with caplog.at_level(logging.WARNING, logger="ranprm.lightning.loggers"):
        logger = build_logger({"name": "wandb", "mode": "disabled"}, tmp_path)
    assert isinstance(logger, CSVLogger)
    assert "wandb service did not start" in caplog.text


def test_a_raising_wandb_logger_does_not_stop_training(voc_root, tmp_path, monkeypatch, caplog):
    """WANDB_MODE=disabled (conftest) gives a real WandbLogger; its image and metric logging then raise.

    Each failure is a warning (once per kind of call), and the panels still reach the disk.
    """
    calls = {"log_image": 0, "log_metrics": 0}

    def raiser(name):
        def raise_(self, *args, **kwargs):
            calls[name] += 1
            raise RuntimeError(f"{name} failed")

        return raise_

    monkeypatch.setattr(WandbLogger, "log_image", raiser("log_image"))
    monkeypatch.setattr(WandbLogger, "log_metrics", raiser("log_metrics"))
    with caplog.at_level(logging.WARNING):
        value = train(compose("train", wandb_overrides(voc_root, tmp_path, epochs=2)))
    assert value is not None and 0.0 <= value <= 1.0
    assert calls["log_image"] == 2 and calls["log_metrics"] > 0  # it really went through the raising paths
    for epoch in (0, 1):
        assert sorted(p.name for p in (tmp_path / "panels" / f"epoch_{epoch:03d}").glob("*.png")) == [
            f"{i}.png" for i in VAL_IDS
        ]
    assert "W&B log_image failed (RuntimeError: log_image failed)" in caplog.text
    assert "W&B log_metrics failed (RuntimeError: log_metrics failed)" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("W&B log_metrics failed" in m for m in warnings) == 1  # not one warning per step
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_offline_wandb_run_holds_the_logged_panel_images(voc_root, tmp_path, monkeypatch, no_wandb_key):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    built = []
    original = train_mod.build_logger

    def recording_build_logger(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train_mod, "build_logger", recording_build_logger)
    try:
        train(compose("train", wandb_overrides(voc_root, tmp_path, epochs=1)))
    finally:
        wandb.finish()  # flushes the offline run to disk
    if not isinstance(built[0], WandbLogger):
        pytest.skip(f"wandb could not start an offline run in this sandbox (got {type(built[0]).__name__})")
    runs = list(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == 1, os.listdir(tmp_path)
    images = sorted((runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == len(VAL_IDS)  # one logged image per panel of the single epoch
    # W&B got the PNG files on disk themselves (copied, not re-encoded from arrays: that cost 10x the time).
    on_disk = sorted((tmp_path / "panels" / "epoch_000").glob("*.png"))
    assert sorted(p.read_bytes() for p in images) == sorted(p.read_bytes() for p in on_disk)
    assert any(runs[0].glob("*.wandb"))  # the run's record, for `wandb sync`
