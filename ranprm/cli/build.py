"""Wiring: the Lightning objects a composed config asks for (module, callbacks), shared by train and the benches."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    TQDMProgressBar,
)
from omegaconf import DictConfig

from ranprm.cli.config import to_plain
from ranprm.data.datamodule import DataConfig, validation_split
from ranprm.errors import ConfigError
from ranprm.lightning.callbacks import SkippedImagesReport
from ranprm.lightning.checkpoint import SaveOnSigterm
from ranprm.lightning.loggers import RunIdentity, run_identity
from ranprm.lightning.module import PRMModule
from ranprm.lightning.panels import PanelCallback

log = logging.getLogger(__name__)


def checkpoint_selection(cfg: DictConfig) -> dict[str, Any]:
    """Whether the run selects a best checkpoint, and on which images: never on the evaluated split.

    Training validates on the evaluated split (`<val_task>/<val_split>`) unless `data.holdout_fraction > 0`;
    then only `last.ckpt` is kept, since a checkpoint chosen on the images it is scored on would inflate them.
    """
    split, evaluated = validation_split(DataConfig.from_config(to_plain(cfg.data)))
    if evaluated:
        return {"selected": "last", "monitor": None, "validation": split,
                "reason": "no held-out split: validation is the evaluated split, so no checkpoint is selected on it "
                          "(data.holdout_fraction > 0 selects on held-out images)"}  # fmt: skip
    return {"selected": "best", "monitor": str(cfg.callbacks.checkpoint.monitor), "validation": split}


def build_callbacks(cfg: DictConfig, run_dir: Path, has_logger: bool) -> list[Callback]:
    ckpt = cfg.callbacks.checkpoint
    selection = checkpoint_selection(cfg)
    callbacks: list[Callback] = []
    if selection["selected"] == "best":
        callbacks.append(
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                filename="best-epoch{epoch:03d}",
                auto_insert_metric_name=False,
                monitor=ckpt.monitor,
                mode=ckpt.mode,
                save_top_k=ckpt.save_top_k,
            )
        )
    else:
        log.info("checkpoints: keeping last.ckpt only; %s", selection["reason"])
    callbacks += [
        # last.ckpt as its own unmonitored top-1 checkpoint, overwritten every epoch (and every N steps): Lightning's
        # `save_last=True` refreshes it only when a new best is saved, leaving it stale after the best epoch.
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename=ModelCheckpoint.CHECKPOINT_NAME_LAST,
            monitor=None,
            save_top_k=1,
            every_n_train_steps=ckpt.get("every_n_train_steps"),
            enable_version_counter=False,
        ),
        SaveOnSigterm(run_dir / "checkpoints"),
        SkippedImagesReport(),
    ]
    bar = cfg.callbacks.progress_bar
    if bar == "rich":
        callbacks.append(RichProgressBar())
    elif bar == "tqdm":
        callbacks.append(TQDMProgressBar())
    elif bar != "none":
        raise ConfigError(f"callbacks.progress_bar={bar!r} is unknown; choose rich, tqdm or none")
    if has_logger:
        # per step: the cosine schedule steps per batch, so a per-epoch reading would hide its shape
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    stopping = cfg.callbacks.get("early_stopping")
    if stopping is not None and stopping.get("enabled", False):
        callbacks.append(
            EarlyStopping(
                monitor=stopping.monitor,
                mode=stopping.mode,
                patience=int(stopping.patience),
                min_delta=float(stopping.get("min_delta", 0.0)),
                verbose=True,
            )
        )
    ema = cfg.callbacks.get("ema")
    if ema is not None and ema.get("enabled", False):
        if not 0.0 < float(ema.decay) < 1.0:
            raise ConfigError(f"callbacks.ema.decay={ema.decay} must be between 0 and 1 (e.g. 0.999)")
        # Lightning's EMA: validation (metrics, panels) and the saved checkpoints use the averaged weights.
        callbacks.append(
            EMAWeightAveraging(
                decay=float(ema.decay),
                update_every_n_steps=int(ema.get("update_every_n_steps", 1)),
                update_starting_at_step=ema.get("update_starting_at_step"),
            )
        )
    panels = cfg.callbacks.get("panels")
    if panels is not None and panels.num_images > 0:
        callbacks.append(
            PanelCallback(
                num_images=panels.num_images,
                every_n_epochs=panels.every_n_epochs,
                max_prms=panels.max_prms,
                tile_size=panels.tile_size,
                output_dir=run_dir,
                precision=panels.precision,
            )
        )
    return callbacks


def build_module(cfg: DictConfig, class_names: tuple[str, ...]) -> PRMModule:
    module = PRMModule(
        class_names=list(class_names),
        backbone=to_plain(cfg.backbone),
        head=to_plain(cfg.head),
        optimizer=to_plain(cfg.optimizer),
        threshold=to_plain(cfg.threshold),
        prm=to_plain(cfg.prm),
        retrieval=to_plain(cfg.retrieval),
        eval=to_plain(cfg.eval),
        image_size=int(cfg.data.image_size),
        channels_last=bool(cfg.get("channels_last", False)),
        compile=bool(cfg.get("compile", False)),
    )
    module.inference_config()  # a bad threshold or prm setting fails now, not at the last epoch's evaluation
    module.build_evaluators()  # and so does a bad eval.* key
    return module


def run_identity_of(cfg: DictConfig) -> RunIdentity:
    """Who this job is for W&B: `task_name` as the job type, the name from the job's overrides and, in a multirun,
    the sweep folder as the group (read from Hydra's runtime config; outside a Hydra app, none of those)."""
    overrides: list[Any] = []
    sweep_dir = None
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        overrides = list(hydra_cfg.overrides.task)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            sweep_dir = hydra_cfg.sweep.dir
    return run_identity(str(cfg.get("task_name") or "train"), overrides, sweep_dir, list(cfg.get("tags") or []))
