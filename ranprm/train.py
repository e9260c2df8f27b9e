"""`python -m ranprm.train [overrides]` (also `ranprm-train`): train a PRM network from image-level labels.

Examples:
    python -m ranprm.train backbone=ran threshold=mean
    python -m ranprm.train -m backbone=ran,resnet50 threshold=fixed,mean,q3
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    TQDMProgressBar,
)
from omegaconf import DictConfig, OmegaConf

from ranprm.checkpoint import AtomicCheckpointIO, SaveOnSigterm
from ranprm.config import config_dir, report_user_errors
from ranprm.data.datamodule import DataConfig, VOCDataModule
from ranprm.data.dataset import SkippedImagesReport
from ranprm.errors import ConfigError
from ranprm.hardware import resolve_precision
from ranprm.io_utils import write_json_atomic
from ranprm.loggers import build_logger
from ranprm.module import PRMModule
from ranprm.viz.callback import PanelCallback

log = logging.getLogger(__name__)


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


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
        backbone=_plain(cfg.backbone),
        head=_plain(cfg.head),
        optimizer=_plain(cfg.optimizer),
        threshold=_plain(cfg.threshold),
        prm=_plain(cfg.prm),
        retrieval=_plain(cfg.retrieval),
        eval=_plain(cfg.eval),
        image_size=int(cfg.data.image_size),
        channels_last=bool(cfg.get("channels_last", False)),
        compile=bool(cfg.get("compile", False)),
    )
    module.inference_config()  # a bad threshold or prm setting fails now, not at the last epoch's evaluation
    return module


def train(cfg: DictConfig) -> float | None:
    """Train, write `metrics.json` into the run folder, and return `cfg.optimized_metric` for sweepers."""
    started = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = VOCDataModule(DataConfig.from_config(_plain(cfg.data)))
    datamodule.setup("fit")  # reads every label now: a bad annotation stops the run before anything is written
    module = build_module(cfg, datamodule.class_names)
    logger = build_logger(_plain(cfg.logger), run_dir, run_config=_plain(cfg))
    trainer_args = _plain(cfg.trainer)
    trainer_args["precision"] = resolve_precision(trainer_args.get("precision", "32-true"),
                                                  trainer_args.get("accelerator", "auto"))  # fmt: skip
    log.info("trainer.precision=%s -> %s", cfg.trainer.get("precision"), trainer_args["precision"])
    trainer = L.Trainer(
        **trainer_args,
        logger=logger if logger is not None else False,
        callbacks=build_callbacks(cfg, run_dir, has_logger=logger is not None),
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],  # a kill while saving leaves the previous last.ckpt whole
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    metrics: dict[str, Any] = {
        k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(("val/", "train/"))
    }
    checkpoint = trainer.checkpoint_callback
    summary = {
        "metrics": metrics,
        "instance_metrics": module.last_instance_metrics,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best_checkpoint": getattr(checkpoint, "best_model_path", None) or None,
        "last_checkpoint": str(last) if (last := run_dir / "checkpoints" / "last.ckpt").is_file() else None,
        "wall_s": round(time.perf_counter() - started, 1),
        "backbone": cfg.backbone.name,
        "threshold": cfg.threshold.name,
        "skipped_images": sum(c.total for c in trainer.callbacks if isinstance(c, SkippedImagesReport)),
    }
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "metrics.json", summary)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        print(f"final metrics: {shown}\nwrote {run_dir / 'metrics.json'} ({summary['wall_s']} s)")
    target = cfg.get("optimized_metric")
    if target and target not in metrics:
        raise ConfigError(f"optimized_metric={target!r} was not logged; logged metrics: {sorted(metrics)}")
    return metrics.get(target) if target else None


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    from ranprm.sweep import run_job

    return run_job(train, cfg)


if __name__ == "__main__":
    main()
