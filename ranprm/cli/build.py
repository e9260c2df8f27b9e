"""Wiring: the Lightning objects a composed config asks for (module, callbacks, trainer), shared by train and the
benches. Each builder checks the values it uses first, so a bad value is one line naming the option (a
`ConfigError`, exit 2) before any data is read or any step runs, instead of a traceback deep in Lightning or torch.
"""

from __future__ import annotations

import inspect
import logging
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    TQDMProgressBar,
)
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig

from ranprm.cli.config import to_plain
from ranprm.cli.targets import instantiate_targets
from ranprm.data.datamodule import DataConfig, validation_split
from ranprm.errors import ConfigError
from ranprm.lightning.callbacks import SkippedImagesReport
from ranprm.lightning.checkpoint import AtomicCheckpointIO, SaveOnSigterm
from ranprm.lightning.hardware import resolve_precision
from ranprm.lightning.loggers import RunIdentity, run_identity
from ranprm.lightning.module import PRMModule
from ranprm.lightning.panels import PanelCallback
from ranprm.utils.checks import check_range, check_value
from ranprm.viz.draw import DISPLAY_SCORE

log = logging.getLogger(__name__)


def check_callbacks_config(cfg: DictConfig) -> None:
    """Ranges of `callbacks.*` (their types and choices are the schema's, `ranprm.cli.schema.CallbacksSchema`)."""
    ckpt = cfg.callbacks.checkpoint
    check_range(ckpt.save_top_k, "callbacks.checkpoint.save_top_k", low=-1)
    check_range(ckpt.get("every_n_train_steps"), "callbacks.checkpoint.every_n_train_steps", low=1)
    panels = cfg.callbacks.get("panels")
    if panels is not None:
        for key, low in (("num_images", 0), ("every_n_epochs", 1), ("max_prms", 1), ("tile_size", 16)):
            check_range(panels.get(key), f"callbacks.panels.{key}", low)
        check_range(panels.get("display_score"), "callbacks.panels.display_score", 0.0, 1.0)


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
    check_callbacks_config(cfg)
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
    bar = progress_bar_callback(cfg.callbacks.progress_bar)
    if bar is not None:
        callbacks.append(bar)
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
    # callbacks.extra.<name>: the user's own Lightning callbacks by _target_ (checked at compose time too)
    callbacks += instantiate_targets(to_plain(cfg.callbacks.get("extra")), "callbacks.extra", Callback)
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
                prm_scale=str(panels.get("prm_scale", "shared")),
                display_score=float(panels.get("display_score", DISPLAY_SCORE)),
            )
        )
    return callbacks


def progress_bar_callback(name: str, option: str = "callbacks.progress_bar") -> Callback | None:
    """Lightning's progress bar `name` (rich or tqdm; both show the time left), None for `none`."""
    bars: dict[str, type[Callback] | None] = {"rich": RichProgressBar, "tqdm": TQDMProgressBar, "none": None}
    if name not in bars:  # the schemas check it at compose time; this is for callers in Python
        raise ConfigError(f"{option}={name!r} is unknown; choose one of {', '.join(bars)}")
    bar = bars[name]
    return bar() if bar is not None else None


def check_optimizer_config(optimizer: dict[str, Any]) -> None:
    """The values torch would reject only at the first step (or with a traceback), named one by one. The typed keys'
    types and `scheduler`'s choices are the schema's (`ranprm.cli.schema.OptimizerSchema`); `momentum` is one of the
    free-form torch keywords, so its type is checked here."""
    check_range(optimizer.get("lr"), "optimizer.lr", low=0.0)
    for key in ("weight_decay", "backbone_lr_mult"):
        check_range(optimizer.get(key), f"optimizer.{key}", low=0.0)
    if "momentum" in optimizer:
        check_range(check_value(optimizer["momentum"], float, "optimizer.momentum"), "optimizer.momentum", 0.0, 1.0)


def check_training_config(cfg: DictConfig) -> None:
    """Ranges of the `head` / `eval` values a training run uses, checked before anything is built (their types are
    the schema's; `head.peak_filter`, a rule name, number or mapping, is checked when the module parses its head)."""
    head = cfg.head
    check_range(head.window, "head.window", low=1)
    check_range(head.sub_pixel_factor, "head.sub_pixel_factor", low=1)
    for key in ("every_n_epochs", "max_images"):
        check_range(cfg.eval.get(key), f"eval.{key}", low=1)


def build_module(cfg: DictConfig, class_names: tuple[str, ...]) -> PRMModule:
    check_training_config(cfg)
    optimizer = to_plain(cfg.optimizer)
    check_optimizer_config(optimizer)
    backbone = to_plain(cfg.backbone)
    try:
        module = PRMModule(
            class_names=list(class_names),
            backbone=backbone,
            head=to_plain(cfg.head),
            optimizer=optimizer,
            threshold=to_plain(cfg.threshold),
            prm=to_plain(cfg.prm),
            retrieval=to_plain(cfg.retrieval),
            eval=to_plain(cfg.eval),
            image_size=int(cfg.data.image_size),
            channels_last=bool(cfg.get("channels_last", False)),
            compile=bool(cfg.get("compile", False)),
        )
    except (TypeError, ValueError) as err:  # a backbone value of the wrong type reaches a torch constructor
        raise ConfigError(f"backbone={backbone.get('name')!r} cannot be built from {backbone} ({err})") from err
    stride = module.model.stride
    if int(cfg.data.image_size) < stride:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is smaller than the network stride of backbone="
            f"{backbone.get('name')} ({stride} px); use data.image_size >= {stride}"
        )
    try:
        module.build_optimizer()  # an argument torch rejects (betas=..., nesterov without momentum, ...) fails now
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as err:  # torch checks its arguments so
        raise ConfigError(f"optimizer={optimizer.get('name')!r} cannot be built from {optimizer} ({err})") from err
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


def trainer_arguments(cfg: DictConfig) -> dict[str, Any]:
    """`cfg.trainer` as `L.Trainer` keyword arguments: names checked against the Trainer's signature, common
    values checked for type and range, `precision=auto` resolved for this machine."""
    args = to_plain(cfg.trainer)
    accepted = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "logger", "callbacks", "plugins"}
    for key in args:
        if key not in accepted:
            raise ConfigError(
                f"trainer.{key} is not a lightning.Trainer argument; see `python -m ranprm.train --cfg job`"
            )
    if "max_epochs" in args and args["max_epochs"] is not None:
        max_epochs = check_value(args["max_epochs"], int, "trainer.max_epochs")
        if max_epochs == 0 or max_epochs < -1:
            raise ConfigError(f"trainer.max_epochs={max_epochs} must be at least 1 (or -1 with trainer.max_steps)")
    for key, low in (("min_epochs", 0), ("max_steps", -1), ("log_every_n_steps", 1), ("num_sanity_val_steps", -1),
                     ("accumulate_grad_batches", 1), ("check_val_every_n_epoch", 1), ("num_nodes", 1)):  # fmt: skip
        if args.get(key) is not None:
            check_range(check_value(args[key], int, f"trainer.{key}"), f"trainer.{key}", low=low)
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
        if args.get(key) is not None:
            value = check_value(args[key], float, f"trainer.{key}")
            check_range(value, f"trainer.{key}", low=0, high=None if isinstance(value, int) else 1.0)
    if args.get("limit_train_batches") is not None and args["limit_train_batches"] == 0:
        # Lightning would train nothing, skip validation and still end "successfully" with a metrics.json that
        # then blocks a real run in the folder
        raise ConfigError(
            "trainer.limit_train_batches=0 trains nothing; give a positive number of batches (or a fraction), or "
            "evaluate a checkpoint with ranprm-evaluate"
        )
    if args.get("gradient_clip_val") is not None:
        check_range(check_value(args["gradient_clip_val"], float, "trainer.gradient_clip_val"),
                    "trainer.gradient_clip_val", low=0.0)  # fmt: skip
    check_value(args.get("inference_mode", False), bool, "trainer.inference_mode")
    devices = check_value(args.get("devices", "auto"), int | str | list[int], "trainer.devices")
    if isinstance(devices, int) and (devices == 0 or devices < -1):
        raise ConfigError(f"trainer.devices={devices} must be at least 1 (or -1 for all, or auto)")
    _check_choice(args, "accelerator", ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())])
    _check_choice(args, "strategy", ["auto", *StrategyRegistry.available_strategies()])
    args["precision"] = resolve_precision(args.get("precision", "32-true"), args.get("accelerator", "auto"))
    _check_choice(args, "precision", _lightning_precisions())
    return args


def _check_choice(args: dict[str, Any], key: str, choices: list[Any]) -> None:
    """A string value of `trainer.<key>` that Lightning would reject only when the Trainer is built (objects pass)."""
    value = args.get(key)
    if isinstance(value, str | int) and choices and value not in choices and str(value) not in map(str, choices):
        shown = ", ".join(str(c) for c in choices[:12]) + (", ..." if len(choices) > 12 else "")
        raise ConfigError(f"trainer.{key}={value!r} is not valid; choose one of {shown}")


def _lightning_precisions() -> list[Any]:
    """Every precision value Lightning's Trainer accepts (read from its type hints, so new ones pass too)."""
    try:
        from lightning.pytorch.trainer.connectors.accelerator_connector import _PRECISION_INPUT
    except ImportError:  # another Lightning layout: the Trainer checks it, one line via build_trainer
        return []

    def flatten(kind: Any) -> list[Any]:
        args = typing.get_args(kind)
        return [v for a in args for v in flatten(a)] if args and typing.get_origin(kind) is not None else [kind]

    return [v for v in flatten(_PRECISION_INPUT) if isinstance(v, str | int)]


def build_trainer(
    cfg: DictConfig, run_dir: Path, loggers: Sequence[Logger] = (), callbacks: list[Callback] | None = None
) -> L.Trainer:
    """The Trainer for `ranprm.train`: checked arguments, ranprm's callbacks (`build_callbacks` unless given), the
    atomic checkpoint writer, and no progress bar at all with `callbacks.progress_bar=none` (Lightning would add
    its own TQDM bar otherwise)."""
    args = trainer_arguments(cfg)
    log.info("trainer.precision=%s -> %s", cfg.trainer.get("precision"), args["precision"])
    if callbacks is None:
        callbacks = build_callbacks(cfg, run_dir, has_logger=bool(loggers))
    try:
        return L.Trainer(
            **args,
            logger=list(loggers) if loggers else False,
            callbacks=callbacks,
            default_root_dir=str(run_dir),
            enable_progress_bar=cfg.callbacks.progress_bar != "none",
            plugins=[AtomicCheckpointIO()],  # a kill while saving leaves the previous last.ckpt whole
        )
    except (MisconfigurationException, ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"trainer: {first} (check the trainer.* values)") from err
