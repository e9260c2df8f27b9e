"""`ranprm-predict`'s writer: overlays per batch and one `predictions.json` at the end, as a Lightning
`BasePredictionWriter` under `Trainer.predict` (so devices, DDP and the progress bar come from the Trainer).

What it guarantees (the entry point `ranprm.predict` checks the folder before the Trainer starts):
- every overlay name is listed in the unfinished-run marker before its file is written, so a run stopped half way
  (a bad image with `on_bad_image=stop`, a kill) leaves exactly the names its rerun may replace;
- an unreadable image is skipped with a warning (`on_bad_image=skip`) or stops the run with a one-line error
  naming it (`stop`; under several processes the one that met it stops writing and the first process raises at
  the end, so no process is left waiting for another);
- `predictions.json` is written last, by the first process, in input order over every process's images (one entry
  set per image: a distributed sampler's repeated images count once), and the marker is removed after it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

from ranprm.data.images import BadImage
from ranprm.errors import DataError
from ranprm.eval.results_io import ResultIds, instances_to_results, write_results
from ranprm.prm.pipeline import ImagePrediction
from ranprm.utils.io import disk_errors_in_one_line
from ranprm.viz.draw import DISPLAY_SCORE, save_png
from ranprm.viz.overlay import render_overlay

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.json"
UNFINISHED_FILE = ".ranprm-predict-unfinished"  # overlays written by a run that has not written predictions.json
ON_BAD_IMAGE = ("skip", "stop")


# After a full disk: the overlays written so far are listed as this run's, so the same command replaces them.
_AGAIN = "run the same command again"


def _gather(value: Any) -> list[Any]:
    """Every process's `value` (just `[value]` outside a multi-process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, value)
        return parts
    return [value]


def _stop_error(bad: BadImage) -> DataError:
    return DataError(f"{bad.error}; remove it, or pass on_bad_image=skip to skip such images")


class OverlayAndResultsWriter(BasePredictionWriter):
    """Writes `<output>/<stem>.png` for every image as its batch ends and `<output>/predictions.json` at the end.

    After `Trainer.predict`: `results` holds the entries of predictions.json (input order), `skipped` the names of
    the unreadable images, `num_images` the number of inputs, on every process alike.
    """

    def __init__(self, output: Path, images: list[Path], class_names: list[str], on_bad_image: str = "skip",
                 source: str = "input", display_score: float = DISPLAY_SCORE,
                 ids: ResultIds | None = None) -> None:  # fmt: skip
        super().__init__(write_interval="batch")
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image={on_bad_image!r}: choose one of {ON_BAD_IMAGE}")
        self.output = Path(output)
        self.images = list(images)
        self.class_names = list(class_names)
        self.on_bad_image = on_bad_image
        self._entries: dict[int, list[dict[str, Any]]] = {}
        self._bad: dict[int, str] = {}
        self._stopped_at: BadImage | None = None  # the bad image this process stopped at (on_bad_image=stop)
        self.results: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.num_images = len(self.images)
        self.source = source  # how messages name the input (the option that gave it)
        self.display_score = display_score  # overlays draw the instances scored at least this; the JSON keeps all
        self.ids = ids  # COCO's image and category ids for predictions.json (`coco_annotations`); None: ranprm's

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._entries, self._bad, self.results, self.skipped = {}, {}, [], []
        self._stopped_at = None

    def _list_as_unfinished(self, name: str) -> None:
        # Listed before the file exists: a kill mid-write leaves it listed. Appends of one short line are atomic,
        # so processes writing their own overlays into one folder share the marker safely.
        with (self.output / UNFINISHED_FILE).open("a") as marker:
            marker.write(f"{name}\n")

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: list[ImagePrediction],
        batch_indices: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._stopped_at is not None:
            return  # this process met a bad image under on_bad_image=stop: it writes nothing more
        bad: BadImage
        for bad in batch["bad"]:
            if self.on_bad_image == "stop":
                if trainer.world_size == 1:
                    raise _stop_error(bad)
                # Under several processes one that raised alone would leave the others waiting for it: it stops
                # writing, and the first process raises for all at the end (`on_predict_epoch_end`).
                self._stopped_at = bad
                return
            log.warning("skipping %s", bad.error)
            self._bad[bad.index] = bad.path.name
        for index, path, raw, pred in zip(batch["index"], batch["path"], batch["raw_image"], prediction, strict=True):
            self._entries[index] = instances_to_results(path.stem, pred.instances, self.class_names, self.ids)
            # The instances and their seeds only: the valid peaks that seeded nothing shown are the panels' business
            # (on photos they lined the border and hid the labels).
            overlay = render_overlay(raw, pred.instances, self.class_names, display_score=self.display_score)
            with disk_errors_in_one_line(self.output / f"{path.stem}.png", _AGAIN):
                self._list_as_unfinished(f"{path.stem}.png")
                save_png(self.output / f"{path.stem}.png", overlay)
            log.debug("%s: %d instance(s)", path.name, len(pred.instances.labels))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        entries: dict[int, list[dict[str, Any]]] = {}
        bad: dict[int, str] = {}
        stops: list[BadImage] = []
        for part_entries, part_bad, part_stop in _gather((self._entries, self._bad, self._stopped_at)):
            entries.update(part_entries)
            bad.update(part_bad)
            stops += [part_stop] if part_stop is not None else []
        self.skipped = [bad[i] for i in sorted(bad)]
        self.results = [entry for i in sorted(entries) for entry in entries[i]]
        # Every process knows the outcome now; only the first raises, so a stop is one line, not one per process
        # (the others return with nothing written; predictions.json is not written either way).
        error = None
        if stops:
            error = _stop_error(min(stops, key=lambda b: b.index))
        elif not entries:
            error = DataError(
                f"{self.source}: none of the {self.num_images} image(s) could be read; nothing to predict"
                if self.skipped
                else f"{self.source}: no image was predicted"
            )
        if error is not None:
            if trainer.is_global_zero:
                raise error
            self.results = []
            return
        if trainer.is_global_zero:
            with disk_errors_in_one_line(self.output / PREDICTIONS_FILE, _AGAIN):
                write_results(self.output / PREDICTIONS_FILE, self.results)
            (self.output / UNFINISHED_FILE).unlink(missing_ok=True)
