"""Wiring: the Lightning objects a composed config asks for (module, callbacks), shared by train and the benches."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    TQDMProgressBar,
)
from omegaconf import DictConfig

from ranprm.cli.config import to_plain
from ranprm.errors import ConfigError
from ranprm.lightning.callbacks import SkippedImagesReport
from ranprm.lightning.checkpoint import SaveOnSigterm
from ranprm.lightning.module import PRMModule
from ranprm.lightning.panels import PanelCallback


def build_callbacks(cfg: DictConfig, run_dir: Path, has_logger: bool) -> list[Callback]:
    ckpt = cfg.callbacks.checkpoint
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best-epoch{epoch:03d}",
            auto_insert_metric_name=False,
            monitor=ckpt.monitor,
            mode=ckpt.mode,
            save_top_k=ckpt.save_top_k,
        ),
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
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
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
