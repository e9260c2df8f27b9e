"""Experiment loggers from the `logger` config group; W&B goes offline by itself and never stops training."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from ranprm.errors import ConfigError

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    """True when an API key is configured (environment or the netrc entry `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def _wandb_logger(cfg: dict[str, Any], save_dir: Path, run_config: dict[str, Any] | None) -> Logger:
    mode = (
        cfg.get("mode")
        or os.environ.get("WANDB_MODE")
        or ("online" if wandb_has_credentials() else "offline")
    )
    if mode == "offline":
        log.info(
            "W&B: no API key configured, logging offline to %s (upload later with `wandb sync`)", save_dir
        )
    wandb_logger = WandbLogger(
        project=cfg.get("project", "ranprm"),
        entity=cfg.get("entity"),
        name=cfg.get("run_name"),
        tags=list(cfg.get("tags") or []),
        save_dir=str(save_dir),
        mode=mode,
        config=run_config,
    )
    _ = wandb_logger.experiment  # start the run now, inside the caller's try, not mid-training
    return wandb_logger


def build_logger(
    cfg: dict[str, Any], save_dir: Path, run_config: dict[str, Any] | None = None
) -> Logger | None:
    """The configured logger; when W&B cannot start, a warning and a CSV logger instead, never a dead run."""
    name = cfg.get("name", "none")
    if name == "none":
        return None
    if name == "csv":
        return CSVLogger(save_dir=str(save_dir), name="csv", version="")
    if name == "tensorboard":
        return TensorBoardLogger(save_dir=str(save_dir), name="tensorboard", version="")
    if name == "wandb":
        try:
            return _wandb_logger(cfg, save_dir, run_config)
        except Exception as err:  # any W&B failure (network, auth, service) must not cost the run
            log.warning(
                "W&B could not start (%s: %s); logging to CSV in %s instead",
                type(err).__name__,
                err,
                save_dir,
            )
            return CSVLogger(save_dir=str(save_dir), name="csv", version="")
    raise ConfigError(f"logger.name={name!r} is unknown; choose wandb, csv, tensorboard or none")
