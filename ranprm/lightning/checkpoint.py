"""Loading a trained ranprm model from a checkpoint, safely and with errors that say what does not fit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ranprm.errors import CheckpointError, ConfigError
from ranprm.lightning.module import PRMModule
from ranprm.utils.io import is_disk_error, load_torch_file, write_via_temp
from ranprm.utils.stop import StopRequested, check_stop

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
    switches = {
        k: v for k, v in (backbone_overrides or {}).items() if k not in ("name", "pretrained") and v is not None
    }
    for key, value in switches.items():
        if key not in backbone_cfg:
            settings = sorted(k for k in backbone_cfg if k not in ("name", "pretrained"))
            raise ConfigError(
                f"backbone_overrides.{key}={value}: the checkpoint's backbone {backbone_cfg['name']!r} has no setting "
                f"{key!r} (its settings: {', '.join(settings) or 'none'}); drop the override"
            )
    backbone_cfg.update(switches)
    hparams["backbone"] = backbone_cfg
    hparams["compile"] = False  # inference runs the eager network (peak backprop patches its convolutions)
    try:
        module = PRMModule(**hparams)
    except (TypeError, ValueError) as err:  # hyper-parameters this version cannot build a model from
        raise CheckpointError(f"ckpt={path}: cannot rebuild its model from the saved settings ({err})") from err
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
    """Lightning's torch checkpoint writer, but to a temporary file renamed into place (`ranprm.utils.io`).

    A run killed while saving (SIGKILL, pre-emption, a full disk) then leaves the previous `last.ckpt` intact, so
    `ckpt_path=last` always resumes from a whole checkpoint; the temp file of a killed write is removed by the next
    run in that folder. A full or read-only disk is one line naming the file, not a traceback.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        parent = super()

        def write(tmp: Path) -> None:
            parent.save_checkpoint(checkpoint, tmp, storage_options)

        try:
            write_via_temp(path, write)
        except OSError as err:
            if not is_disk_error(err):
                raise
            raise CheckpointError(
                f"cannot write the checkpoint {path} ({err.strerror or err}); free space or fix the folder's "
                "permissions, then resume with ckpt_path=last (the previous checkpoint is kept)"
            ) from err


class SaveOnSigterm(Callback):
    """On a stop signal (SIGTERM: cluster pre-emption, SLURM signals the whole process group; SIGINT: Ctrl+C;
    SIGHUP: a closed terminal) save `<dirpath>/last.ckpt` before the run stops, and remember it and the signal so
    that `ranprm.train` can exit non-zero with a resume hint (`RunInterrupted`).

    Lightning only sets `trainer.received_sigterm` and raises `SIGTERMException` (a `SystemExit` with code 0) at the
    next batch boundary, and for Ctrl+C saves nothing. Here every stop signal is recorded (`ranprm.utils.stop`),
    checked after each training batch (a consistent state: the step that was running finished) and between images
    in validation, panels and peak backpropagation (`StopRequested`), so a run answers within seconds however
    long its validation batches are. A DataLoader worker that died of the same signal (it should not:
    `ranprm.data.sampling.worker_init` makes workers ignore these signals) surfaces as another exception between
    batches; `received_sigterm` still says why.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None
        self.signal_name = "SIGTERM"

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        check_stop()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, StopRequested):
            self.signal_name = exception.signal_name
        elif not (isinstance(exception, SIGTERMException) or trainer.received_sigterm):
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        self.saved = path
        log.warning("received %s: saved %s at global step %d", self.signal_name, path, trainer.global_step)


RESUME_KEYS = ("state_dict", "hyper_parameters", "optimizer_states", "loops", "global_step", "epoch")


def read_resume_checkpoint(path: str | Path, option: str = "ckpt_path") -> dict[str, Any]:
    """The header of a training checkpoint to resume from, read cheaply (tensors memory-mapped, never unpickled as
    code): a missing, truncated, crafted or weights-only file is one line naming `option`, before any training."""
    ckpt = load_torch_file(path, option, mmap=True)
    missing = [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{option}={path}: not a ranprm training checkpoint that can be resumed (it lacks {', '.join(missing)}); "
            "to start a new run from its weights use backbone.pretrained=<path> instead"
        )
    return ckpt
