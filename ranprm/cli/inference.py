"""What `ranprm-predict` and `ranprm-evaluate` share: the device, and a checkpoint with the command line's
inference settings on top of its own."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from ranprm.cli.config import to_plain
from ranprm.errors import ConfigError
from ranprm.lightning.checkpoint import load_module
from ranprm.lightning.module import PRMModule
from ranprm.prm.pipeline import PRM_DEFAULTS


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
