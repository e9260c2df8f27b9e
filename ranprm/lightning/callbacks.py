"""Small Lightning callbacks and the one rule for "every N epochs, and always the last"."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def due_this_epoch(trainer: L.Trainer, every_n_epochs: int | None) -> bool:
    """True at the end of every `every_n_epochs`-th epoch (1-based) and at the run's last epoch; never in the
    sanity check. `every_n_epochs` None or 0: the last epoch only. Instance evaluation and panels share it."""
    if trainer.sanity_checking:
        return False
    epoch = trainer.current_epoch + 1
    last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
    return last or bool(every_n_epochs and epoch % int(every_n_epochs) == 0)


class SkippedImagesReport(Callback):
    """Counts the images `data.skip_bad_images=true` dropped (collate's `skipped`) and reports them at the end."""

    def __init__(self) -> None:
        self.train_skipped = 0
        self.val_skipped = 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.train_skipped += int(batch.get("skipped", 0)) if isinstance(batch, dict) else 0

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking and isinstance(batch, dict):
            self.val_skipped += int(batch.get("skipped", 0))

    @property
    def total(self) -> int:
        return self.train_skipped + self.val_skipped

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.total:
            log.warning(
                "skipped %d unreadable image loads (%d in training, %d in validation, counted per epoch); "
                "see the 'skipping' warnings for their names",
                self.total,
                self.train_skipped,
                self.val_skipped,
            )
