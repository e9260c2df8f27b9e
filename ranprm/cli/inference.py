"""What `ranprm-predict` and `ranprm-evaluate` share: their required values, the Trainer that runs the model
(`device` / `trainer.*`, a progress bar), and a checkpoint with the command line's inference settings on top of its
own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig

from ranprm.cli.build import progress_bar_callback, trainer_arguments
from ranprm.cli.config import to_plain
from ranprm.errors import ConfigError
from ranprm.lightning.checkpoint import load_module
from ranprm.lightning.module import PRMModule
from ranprm.prm.pipeline import PRM_DEFAULTS
from ranprm.utils.stop import StopRequested, stop_on_signals


def resolve_device(name: str) -> torch.device:
    """`device=` as a torch device: auto (CUDA when there is one), cpu, cuda, cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: no CUDA device is available; use device=cpu or device=auto")
    return device


def apply_inference_overrides(module: PRMModule, cfg: DictConfig) -> dict[str, Any]:
    """Replace the checkpoint's inference settings by those the command line gives; returns the settings used.

    `cfg.threshold` / `cfg.retrieval` (a chosen config group) replace the whole group; each non-null key of
    `cfg.prm` replaces that key of the checkpoint's prm settings. Parsed once here, before any image is read.
    """
    hp = module.hparams
    chosen = {group: to_plain(cfg.get(group)) for group in ("threshold", "retrieval")}
    for group, value in chosen.items():
        if value is None and hp.get(group) is None:
            raise ConfigError(f"ckpt has no {group} settings; choose one, e.g. {group}=<option>")
    prm = {k: v for k, v in (to_plain(cfg.get("prm")) or {}).items() if v is not None}
    module.configure_inference(threshold=chosen["threshold"], retrieval=chosen["retrieval"], prm=prm)
    return inference_settings(module)


def inference_settings(module: PRMModule) -> dict[str, Any]:
    """The threshold, retrieval and prm settings the module infers with (recorded beside the metrics), and where
    its class calibration came from when the threshold uses one."""
    hp = module.hparams
    prm = {**PRM_DEFAULTS, **dict(hp["prm"] or {})}  # keys a checkpoint predates run at their defaults
    settings = {"threshold": dict(hp["threshold"]), "retrieval": dict(hp["retrieval"]), "prm": prm}
    if module.inference_config().thresholds.class_distribution == "dataset" and module.class_calibration is not None:
        settings["class_calibration"] = module.class_calibration.summary()
    return settings


def load_for_inference(cfg: DictConfig, device: torch.device, class_names: tuple[str, ...] | None = None) -> PRMModule:
    """The checkpoint `cfg.ckpt` (read once) with `cfg`'s backbone switches and inference settings, on `device`."""
    module = load_module(cfg.ckpt, class_names, backbone_overrides=to_plain(cfg.backbone_overrides))
    apply_inference_overrides(module, cfg)
    return module.to(device)


# ------------------------------------------------------------------------------------------ the Trainer
# Strategies whose processes are started by the Trainer inside this call (multiprocessing spawn/fork): their
# results (metrics, predictions) stay in the child processes, so the entry points could not write them.
_CHILD_PROCESS_STRATEGIES = ("spawn", "fork", "notebook")
INFERENCE_PRECISION = "32-true"


def inference_trainer_arguments(cfg: DictConfig) -> dict[str, Any]:
    """`device` and `trainer.*` of `ranprm-evaluate` / `ranprm-predict` as `L.Trainer` keyword arguments.

    `device=auto|cpu|cuda|cuda:N` is the one-device shorthand (as before the Trainer ran these commands);
    `trainer.accelerator` / `trainer.devices` choose several devices (one process each, DDP) and then replace it.
    Precision is fp32: `predict_images` runs the network and the peak backprop without autocast so that instance
    maps never depend on a precision plugin; `prm.precision=bf16` is the one reduced-precision switch.
    """
    trainer = to_plain(cfg.get("trainer")) or {}
    unknown = sorted(set(trainer) - {"accelerator", "devices", "strategy", "num_nodes"})
    if unknown:
        raise ConfigError(
            f"trainer.{unknown[0]} is not a setting of this command; it takes trainer.accelerator, trainer.devices, "
            "trainer.strategy and trainer.num_nodes (precision: prm.precision=bf16)"
        )
    device_name = str(cfg.get("device", "auto"))
    accelerator, devices = trainer.get("accelerator"), trainer.get("devices")
    if accelerator is None and devices is None:
        # auto: CUDA when there is one, else the CPU, as `resolve_device` (Lightning's own auto would also pick MPS)
        accelerator, devices = _from_device(resolve_device(device_name))
    elif device_name != "auto":
        raise ConfigError(
            f"device={device_name} and trainer.accelerator/trainer.devices both choose the device; give device= for "
            "one device, or trainer.devices=N (with trainer.accelerator) for several"
        )
    args = {
        "accelerator": "auto" if accelerator is None else accelerator,
        "devices": 1 if devices is None else devices,
        "strategy": trainer.get("strategy") or "auto",
        "num_nodes": trainer.get("num_nodes") or 1,
    }
    strategy = args["strategy"]
    if isinstance(strategy, str) and any(word in strategy for word in _CHILD_PROCESS_STRATEGIES):
        raise ConfigError(
            f"trainer.strategy={strategy}: its processes keep their results to themselves; use trainer.strategy=ddp "
            "(or auto), which runs this command once per device"
        )
    checked = trainer_arguments(DictConfig({"trainer": {**args, "precision": INFERENCE_PRECISION}}))
    return {key: checked[key] for key in (*args, "precision")}


def _from_device(device: torch.device) -> tuple[str, int | list[int]]:
    """(accelerator, devices) for one device."""
    if device.type == "cuda":
        return "gpu", [device.index if device.index is not None else torch.cuda.current_device()]
    if device.type in ("cpu", "mps"):
        return device.type, 1
    raise ConfigError(f"device={device} is not supported here; use auto, cpu, cuda, cuda:N or mps")


def build_inference_trainer(
    cfg: DictConfig, root_dir: Path, callbacks: list[Callback] | None = None, progress_bar: str = "tqdm"
) -> L.Trainer:
    """A Trainer for one pass over images (`Trainer.test` / `Trainer.predict`): no logger, no checkpoints, autograd
    on (PRM backprop), the chosen progress bar with an ETA (`tqdm`, `rich`, or `none`)."""
    args = inference_trainer_arguments(cfg)
    bar = progress_bar_callback(progress_bar, "progress_bar")
    try:
        return L.Trainer(
            **args,
            logger=False,
            callbacks=[*(callbacks or []), *([bar] if bar is not None else [])],
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=bar is not None,
            inference_mode=False,  # peak backprop needs autograd
            default_root_dir=str(root_dir),
        )
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"trainer: {first} (check device= and the trainer.* values)") from err


def root_device(trainer: L.Trainer) -> torch.device:
    """The device this process runs the model on (before `Trainer.test`/`predict` move it there)."""
    return trainer.strategy.root_device


@contextlib.contextmanager
def answering_signals() -> Iterator[None]:
    """Around predict and evaluate: SIGTERM / SIGINT / SIGHUP stop the command between images (`ranprm.utils.stop`)
    and exit non-zero. Lightning's own answer to SIGTERM in `Trainer.test` / `predict` is a `SIGTERMException`, a
    `SystemExit` with code 0: evaluate then ended as if it had succeeded; here it is the signal's exit code."""
    with stop_on_signals():
        try:
            yield
        except SIGTERMException:
            import signal

            raise StopRequested(signal.SIGTERM) from None
