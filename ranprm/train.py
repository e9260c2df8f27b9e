"""`python -m ranprm.train [overrides]` (also `ranprm-train`): train a PRM network from image-level labels.

Examples:
    python -m ranprm.train backbone=ran threshold=mean
    python -m ranprm.train -m backbone=ran,resnet50 threshold=fixed,mean,q3
    python -m ranprm.train resume=outputs/train/2026-01-01/12-00-00-000000   # continue an interrupted run

The run folder is never reused silently: one that holds another run's results is refused unless the run resumes
from its own checkpoint or `overwrite=true` is given (`ranprm.cli.run_dir`). A SIGTERM saves `last.ckpt`, records
`interrupted.json` and exits with 143; the resumed run trains on exactly the batches the uninterrupted one would
have, so it ends with the same step count and the same metrics.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from ranprm.cli.build import (
    build_callbacks,
    build_module,
    build_trainer,
    check_callbacks_config,
    check_optimizer_config,
    check_training_config,
    checkpoint_selection,
    run_identity_of,
    trainer_arguments,
)
from ranprm.cli.config import hydra_main, report_user_errors, to_plain
from ranprm.cli.print_config import print_config_tree
from ranprm.cli.resume import check_checkpoint_matches, main_argv
from ranprm.cli.run_dir import apply_folder_plan, commit_hydra_files, hold_folder, plan_training_folder
from ranprm.cli.sweep import FAILED_FILE, INTERRUPTED_FILE, same_sweep_job
from ranprm.data.datamodule import DataConfig, VOCDataModule
from ranprm.errors import ConfigError, RunInterrupted
from ranprm.lightning.callbacks import SkippedImagesReport
from ranprm.lightning.checkpoint import SaveOnSigterm, read_resume_checkpoint
from ranprm.lightning.loggers import build_loggers
from ranprm.lightning.module import PRMModule
from ranprm.utils.checks import check_value
from ranprm.utils.io import check_writable, write_json_atomic
from ranprm.utils.stop import StopRequested, received, stop_on_signals

log = logging.getLogger(__name__)

STALE_RECORDS = (FAILED_FILE, INTERRUPTED_FILE)  # superseded once a (resumed) run finishes


def checkpoint_bytes(module: PRMModule) -> int:
    """About what one checkpoint of `module` takes on disk: weights plus the optimizer's per-weight state."""
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    slots = {"adam": 2, "adamw": 2, "sgd": 1}.get(str(module.hparams.optimizer.get("name")), 2)
    return weights * (1 + slots)


def _interrupted(trainer: L.Trainer, run_dir: Path, saver: SaveOnSigterm) -> RunInterrupted:
    """Record the interruption in the run folder (`interrupted.json`, read by the sweep summary) and describe it."""
    resume = f"ranprm-train resume={run_dir}"
    name = saver.signal_name
    record = {
        "signal": name,
        "checkpoint": str(saver.saved) if saver.saved else None,
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "resume": resume,
    }
    if trainer.is_global_zero:
        write_json_atomic(run_dir / INTERRUPTED_FILE, record)
    saved = f"saved {saver.saved} at step {trainer.global_step}" if saver.saved else "no checkpoint could be saved"
    return RunInterrupted(
        f"{name}: {saved}; continue with `{resume}`", name, 128 + signal.Signals[name], record["checkpoint"]
    )


def train(cfg: DictConfig) -> float | None:
    """Train, write `metrics.json` into the run folder, and return `cfg.optimized_metric` for sweepers.

    The run folder is this process's for the whole run (`hold_folder`: a second run into it refuses at once).
    Order: decide what the run folder allows (no side effect), then check every config value and build the model
    and the data index (one line and exit 2 for anything wrong, before a step runs or a file is replaced), then
    apply the folder decision, then train.
    """
    with hold_folder(Path(cfg.paths.output_dir), _folder_option()), stop_on_signals():
        return _train(cfg)


def _train(cfg: DictConfig) -> float | None:
    started = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    if cfg.get("resume"):
        raise ConfigError(
            "resume= is read by the ranprm-train command line; in Python compose the overrides with "
            "ranprm.cli.resume.resume_overrides(run_dir, extra)"
        )
    overwrite = check_value(cfg.get("overwrite", False), bool, "overwrite")
    plan = plan_training_folder(run_dir, cfg.get("ckpt_path"), overwrite, _folder_option(), same_sweep_job(run_dir))
    if plan.finished:  # a continued sweep: this job's result is already in its folder
        recorded = json.loads((run_dir / "metrics.json").read_text()).get("metrics", {})
        target = cfg.get("optimized_metric")
        return recorded.get(target) if target else None
    header = read_resume_checkpoint(plan.resume) if plan.resume is not None else None

    # Pure checks first: nothing generated, read or built yet (and the config is printed only once it is valid:
    # a range error is one line, not the end of a screenful).
    check_training_config(cfg)
    check_optimizer_config(to_plain(cfg.optimizer))
    data_cfg = DataConfig.from_config(to_plain(cfg.data))
    trainer_arguments(cfg)  # checked now; built again with the logger below
    check_callbacks_config(cfg)
    if cfg.get("print_config"):
        print_config_tree(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = VOCDataModule(data_cfg, seed=cfg.seed)  # the embedded dataset is generated here on first use
    module = build_module(cfg, datamodule.class_names)
    if header is not None:
        check_checkpoint_matches(header["hyper_parameters"], dict(module.hparams), plan.resume)
        _check_not_finished(header, cfg, plan.resume)
    check_writable(run_dir, "hydra.run.dir", min_free_bytes=3 * checkpoint_bytes(module))  # last + best + temp
    datamodule.setup("fit")  # reads every label and the evaluated masks' headers: bad data stops the run here

    apply_folder_plan(plan)
    commit_hydra_files(run_dir, resumed=plan.resume is not None)
    resume_step = int(header["global_step"]) if header is not None else None
    loggers = build_loggers(to_plain(cfg.logger), run_dir, run_config=to_plain(cfg), identity=run_identity_of(cfg),
                            resume_step=resume_step)  # fmt: skip
    trainer = build_trainer(cfg, run_dir, loggers, build_callbacks(cfg, run_dir, has_logger=bool(loggers)))
    saver = next(c for c in trainer.callbacks if isinstance(c, SaveOnSigterm))
    if plan.resume is not None:
        log.info("resuming from %s (epoch %s, global step %s)", plan.resume, header["epoch"], header["global_step"])
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(plan.resume) if plan.resume else None)
    except (SIGTERMException, StopRequested):
        raise _interrupted(trainer, run_dir, saver) from None
    if (trainer.received_sigterm or received() is not None) and trainer.global_step < _planned_steps(trainer):
        raise _interrupted(trainer, run_dir, saver)  # stopped between epochs, before the loop could raise

    metrics: dict[str, Any] = {  # an undefined metric (logged as NaN: no GT instance, ...) is null in metrics.json
        k: None if math.isnan(float(v)) else float(v)
        for k, v in sorted(trainer.callback_metrics.items())
        if k.startswith(("val/", "train/"))
    }
    selection = checkpoint_selection(cfg)
    summary = {
        "metrics": metrics,
        "instance_metrics": module.last_instance_metrics,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best_checkpoint": _best_checkpoint(trainer, run_dir) if selection["selected"] == "best" else None,
        "checkpoint_selection": selection,  # never on the evaluated split: with no held-out split, last only
        "last_checkpoint": str(last) if (last := run_dir / "checkpoints" / "last.ckpt").is_file() else None,
        "resumed_from": str(plan.resume) if plan.resume else None,
        "wall_s": round(time.perf_counter() - started, 1),
        "backbone": cfg.backbone.name,
        "threshold": cfg.threshold.name,
        "class_calibration": module.class_calibration.summary() if module.class_calibration is not None else None,
        "skipped_images": sum(c.total for c in trainer.callbacks if isinstance(c, SkippedImagesReport)),
    }
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "metrics.json", summary)
        for name in STALE_RECORDS:
            (run_dir / name).unlink(missing_ok=True)
        shown = ", ".join(f"{k}={'–' if v is None else f'{v:.4f}'}" for k, v in metrics.items())
        print(f"final metrics: {shown}\nwrote {run_dir / 'metrics.json'} ({summary['wall_s']} s)")
    target = cfg.get("optimized_metric")
    if target and target not in metrics:
        raise ConfigError(f"optimized_metric={target!r} was not logged; logged metrics: {sorted(metrics)}")
    return metrics.get(target) if target else None


def _check_not_finished(header: dict[str, Any], cfg: DictConfig, ckpt: Path) -> None:
    """Resuming a run that already trained all its epochs would train nothing and log no metric: say so now."""
    progress = header.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    done, max_epochs = progress.get("processed"), cfg.trainer.get("max_epochs")
    if isinstance(done, int) and isinstance(max_epochs, int) and max_epochs != -1 and done >= max_epochs:
        raise ConfigError(
            f"ckpt_path={ckpt}: the run already trained its {done} epoch(s) (trainer.max_epochs={max_epochs}); pass a "
            "larger trainer.max_epochs to train on"
        )


def _folder_option() -> str:
    """The setting that chose the run folder, for messages: `hydra.sweep.dir` in a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return "hydra.sweep.dir"
    return "hydra.run.dir"


def _planned_steps(trainer: L.Trainer) -> float:
    if trainer.max_steps not in (None, -1):
        return float(trainer.max_steps)
    return float(trainer.estimated_stepping_batches)


def _best_checkpoint(trainer: L.Trainer, run_dir: Path) -> str | None:
    """The monitored checkpoint, as a file that exists. Lightning restores `best_model_path` from the checkpoint
    even when the run folder has moved since (or the run resumed from another folder's checkpoint), so it can
    name a file that is gone: then the file of that name in this run's `checkpoints/`, else None."""
    path = getattr(trainer.checkpoint_callback, "best_model_path", None)
    if not path:
        return None
    for candidate in (Path(path), run_dir / "checkpoints" / Path(path).name):
        if candidate.is_file():
            return str(candidate)
    log.warning("the best checkpoint Lightning recorded, %s, does not exist; metrics.json leaves it out", path)
    return None


@hydra_main("train")
@report_user_errors
def _main(cfg: DictConfig) -> float | None:
    from ranprm.cli.sweep import run_job

    return run_job(train, cfg)


def main() -> float | None:
    """The console script: `resume=<run dir>` is expanded into that run's overrides first (`ranprm.cli.resume`)."""
    report_user_errors(main_argv)()
    return _main()


if __name__ == "__main__":
    main()
