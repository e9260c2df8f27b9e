"""Loading a trained ranprm model from a checkpoint, safely and with errors that say what does not fit."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ranprm.errors import CheckpointError
from ranprm.lightning.module import PRMModule
from ranprm.utils.io import load_torch_file

log = logging.getLogger(__name__)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, read with `weights_only=True` so a crafted file cannot run code."""
    ckpt = load_torch_file(path, "ckpt")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"ckpt={path}: not a ranprm training checkpoint (no state_dict/hyper_parameters)")
    return ckpt


def load_module(
    path: str | Path,
    class_names: tuple[str, ...] | None = None,
    backbone_overrides: dict[str, Any] | None = None,
) -> PRMModule:
    """Rebuild the trained PRMModule in eval mode.

    `class_names`: the dataset's classes; a checkpoint trained on other classes is refused, naming both.
    `backbone_overrides`: inference-time switches that need no retraining (e.g. RAN's `mask_grad`).
    """
    ckpt = read_checkpoint(path)
    hparams = dict(ckpt["hyper_parameters"])
    trained_classes = tuple(hparams.get("class_names", ()))
    if class_names is not None and tuple(class_names) != trained_classes:
        raise CheckpointError(
            f"ckpt={path}: trained on {len(trained_classes)} classes {list(trained_classes)[:4]}..., but the data "
            f"has {len(class_names)} classes {list(class_names)[:4]}...; use a checkpoint trained on this dataset"
        )
    backbone_cfg = dict(hparams["backbone"])
    backbone_cfg["pretrained"] = False  # the checkpoint holds the weights; never download or read them again
    backbone_cfg.update(
        {k: v for k, v in (backbone_overrides or {}).items() if k not in ("name", "pretrained") and v is not None}
    )
    hparams["backbone"] = backbone_cfg
    hparams["compile"] = False  # inference runs the eager network (peak backprop patches its convolutions)
    module = PRMModule(**hparams)
    try:
        missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as err:  # a size mismatch: same names, other widths or class count
        first = str(err).strip().splitlines()[-1].strip()[:200]
        raise CheckpointError(f"ckpt={path}: weights do not fit backbone {backbone_cfg['name']!r} ({first})") from err
    if missing or unexpected:
        raise CheckpointError(
            f"ckpt={path}: weights do not fit backbone {backbone_cfg['name']!r} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[:2]}); was it trained with another "
            "backbone?"
        )
    module.on_load_checkpoint(ckpt)  # what the module stores beside its weights (the class calibration)
    return module.eval()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint writer, but to a temporary file renamed into place.

    A run killed while saving (SIGKILL, pre-emption, a full disk) then leaves the previous `last.ckpt` intact, so
    `ckpt_path=last` always resumes from a whole checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class SaveOnSigterm(Callback):
    """On SIGTERM (cluster pre-emption) save `<dirpath>/last.ckpt` before Lightning stops the run.

    Lightning only sets `trainer.received_sigterm` and raises `SIGTERMException` at the next batch boundary; it
    saves nothing. Resume with `ckpt_path=last` and the same `hydra.run.dir`.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            path = self.dirpath / "last.ckpt"
            trainer.save_checkpoint(path)
            log.warning("received SIGTERM: saved %s; resume with ckpt_path=last", path)
