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


class SafeWandbLogger(WandbLogger):
    """A `WandbLogger` whose logging calls turn any exception into a warning: W&B never stops training.

    Each kind of call warns the first time it fails and logs at debug level after that, so a W&B outage does not
    flood the console with one warning per step.
    """

    def _guard(self, name: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except Exception as err:  # network, service or media errors: the run goes on without W&B
            warned: set[str] = self.__dict__.setdefault("_failed_calls", set())
            level = logging.DEBUG if name in warned else logging.WARNING
            warned.add(name)
            log.log(level, "W&B %s failed (%s: %s); training goes on", name, type(err).__name__, err)
            return None

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        self._guard("log_metrics", super().log_metrics, metrics, step)

    def log_hyperparams(self, params: Any) -> None:
        self._guard("log_hyperparams", super().log_hyperparams, params)

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self._guard("log_image", super().log_image, key, images, step, **kwargs)

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        self._guard("log_table", super().log_table, *args, **kwargs)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._guard("after_save_checkpoint", super().after_save_checkpoint, checkpoint_callback)

    def finalize(self, status: str) -> None:
        self._guard("finalize", super().finalize, status)


def _wandb_logger(cfg: dict[str, Any], save_dir: Path, run_config: dict[str, Any] | None) -> Logger:
    mode = cfg.get("mode") or os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")
    if mode == "offline":
        log.info("W&B: no API key configured, logging offline to %s (upload later with `wandb sync`)", save_dir)
    wandb_logger = SafeWandbLogger(
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


def build_logger(cfg: dict[str, Any], save_dir: Path, run_config: dict[str, Any] | None = None) -> Logger | None:
    """The configured logger; when W&B cannot start, a warning and a CSV logger instead, never a dead run."""
    name = cfg.get("name", "none")
    if name == "none":
        return None
    if name == "csv":
        return CSVLogger(save_dir=str(save_dir), name="csv", version="")
    if name == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ConfigError("logger=tensorboard needs the tensorboard package: pip install 'ranprm[tensorboard]'")
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
