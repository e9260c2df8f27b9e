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

import lightning as L
from omegaconf import DictConfig

from ranprm.cli.build import build_callbacks, build_module, checkpoint_selection, run_identity_of
from ranprm.cli.config import hydra_main, report_user_errors, to_plain
from ranprm.cli.print_config import print_config_tree
from ranprm.data.datamodule import DataConfig, VOCDataModule
from ranprm.errors import ConfigError
from ranprm.lightning.callbacks import SkippedImagesReport
from ranprm.lightning.checkpoint import AtomicCheckpointIO
from ranprm.lightning.hardware import resolve_precision
from ranprm.lightning.loggers import build_logger
from ranprm.utils.io import write_json_atomic

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float | None:
    """Train, write `metrics.json` into the run folder, and return `cfg.optimized_metric` for sweepers."""
    started = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    if cfg.get("print_config"):
        print_config_tree(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = VOCDataModule(DataConfig.from_config(to_plain(cfg.data)))
    datamodule.setup("fit")  # reads every label now: a bad annotation stops the run before anything is written
    module = build_module(cfg, datamodule.class_names)
    logger = build_logger(to_plain(cfg.logger), run_dir, run_config=to_plain(cfg), identity=run_identity_of(cfg))
    trainer_args = to_plain(cfg.trainer)
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
    selection = checkpoint_selection(cfg)
    best = trainer.checkpoint_callback if selection["selected"] == "best" else None
    summary = {
        "metrics": metrics,
        "instance_metrics": module.last_instance_metrics,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best_checkpoint": getattr(best, "best_model_path", None) or None,
        "checkpoint_selection": selection,  # never on the evaluated split: with no held-out split, last only
        "last_checkpoint": str(last) if (last := run_dir / "checkpoints" / "last.ckpt").is_file() else None,
        "wall_s": round(time.perf_counter() - started, 1),
        "backbone": cfg.backbone.name,
        "threshold": cfg.threshold.name,
        "class_calibration": module.class_calibration.summary() if module.class_calibration is not None else None,
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


@hydra_main("train")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    from ranprm.cli.sweep import run_job

    return run_job(train, cfg)


if __name__ == "__main__":
    main()
