"""The Lightning callback that renders CRM/PRM panels after each validation epoch.

Panels go to `<run>/panels/epoch_NNN/<image_id>.png` whatever the logger, to W&B through `WandbLogger.log_image`
and to TensorBoard as one image per panel image (`val/panels/<image_id>`). Every panel of a run is padded to one
size (`largest_layout`, grown only by a panel busier than it), so W&B shows them side by side without its "Images
sizes do not match" warning and TensorBoard's slider keeps one frame. Rendering is `ranprm.viz.panels`; this file
only picks the images, runs inference and hands the results over. A logging failure is a warning, never a dead run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from ranprm.data.dataset import collate
from ranprm.data.voc import InstanceTargets
from ranprm.errors import ConfigError
from ranprm.lightning.callbacks import due_this_epoch
from ranprm.prm.backprop import PRM_PRECISIONS
from ranprm.prm.pipeline import ImagePrediction
from ranprm.viz.draw import DISPLAY_SCORE, save_png
from ranprm.viz.layout import pad_to
from ranprm.viz.panels import PRM_SCALES, PanelInputs, PanelStyle, largest_layout, panel_caption, render_panel

log = logging.getLogger(__name__)
PANEL_KEY = "val/panels"


# The panels' peak backprop: a `prm.precision` name, or `auto`: bf16 when the run trains in bf16 (the hardware
# has it; the maps differ from fp32 by ~1e-3 on average, invisible in a panel, at about 0.6x the cost), else fp32.
AUTO_PRECISION = "auto"


class PanelCallback(Callback):
    """After each validation epoch (not the sanity check, rank zero only), render `num_images` fixed images."""

    def __init__(
        self,
        num_images: int = 8,
        every_n_epochs: int = 1,
        max_prms: int = 8,
        tile_size: int | None = None,
        output_dir: str | Path | None = None,
        precision: str = "auto",
        prm_scale: str = "shared",
        display_score: float = DISPLAY_SCORE,
    ) -> None:
        if precision != AUTO_PRECISION and precision not in PRM_PRECISIONS:
            choices = [AUTO_PRECISION, *PRM_PRECISIONS]
            raise ConfigError(f"callbacks.panels.precision={precision!r} is not valid; choose one of {choices}")
        if prm_scale not in PRM_SCALES:
            raise ConfigError(f"callbacks.panels.prm_scale={prm_scale!r} is not valid; choose one of {PRM_SCALES}")
        self.precision = precision
        self.prm_scale = prm_scale
        self.display_score = display_score
        self.canvas_hw: tuple[int, int] | None = None  # the size of every panel of this run (grown, never shrunk)
        self.num_images = num_images
        self.every_n_epochs = max(1, every_n_epochs)
        self.max_prms = max_prms
        self.tile_size = tile_size
        self.output_dir = Path(output_dir) if output_dir is not None else None

    def _should_render(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and self.num_images > 0 and due_this_epoch(trainer, self.every_n_epochs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_render(trainer):
            return
        started = time.perf_counter()
        dataset = getattr(trainer.datamodule, "val_set", None) if trainer.datamodule is not None else None
        if dataset is None or len(dataset) == 0:
            return
        # The first images of the validation split: the same ones every epoch, so the maps can be compared.
        samples = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
        batch = collate(samples)
        if "image" not in batch:
            return
        panels, captions = self.render(pl_module, batch, self.prm_dtype(str(trainer.precision)))
        out_dir = (self.output_dir or Path(trainer.default_root_dir)) / "panels" / f"epoch_{trainer.current_epoch:03d}"
        files = [out_dir / f"{image_id}.png" for image_id in batch["image_id"]]
        for file, panel in zip(files, panels, strict=True):
            save_png(file, panel)
        for logger in trainer.loggers:
            try:
                if isinstance(logger, WandbLogger):
                    self._log_to_wandb(logger, [str(f) for f in files], captions, trainer)
                elif isinstance(logger, TensorBoardLogger):
                    self._log_to_tensorboard(logger, list(batch["image_id"]), panels, trainer)
            except Exception as err:  # a logger must never cost the run
                log.warning("could not log panels to %s (%s: %s); the PNGs are in %s", type(logger).__name__,
                            type(err).__name__, err, out_dir)  # fmt: skip
        # The cost is logged so that it can be weighed against the epoch's (BENCHMARKS.md, "Panels").
        log.info("panels of epoch %d: %d images in %.2f s, in %s", trainer.current_epoch, len(panels),
                 time.perf_counter() - started, out_dir)  # fmt: skip

    @staticmethod
    def _log_to_wandb(logger: WandbLogger, files: list[str], captions: list[str], trainer: L.Trainer) -> None:
        """`log_image` in a row that also holds `epoch`, W&B's x-axis for the panels (the slider shows epochs).

        W&B gets the PNG files already written, not the arrays: it copies a file, but re-encodes an array with
        PIL, which took 0.89 s per epoch for the 8 default panels (0.09 s from the files).
        """
        experiment = logger.experiment
        experiment.define_metric(PANEL_KEY, step_metric="epoch")  # idempotent; Lightning's default is global_step
        experiment.log({"epoch": trainer.current_epoch}, commit=False)  # joins the row log_image commits
        logger.log_image(key=PANEL_KEY, images=files, step=trainer.global_step, caption=captions)

    @staticmethod
    def _log_to_tensorboard(
        logger: TensorBoardLogger, image_ids: list[str], panels: list[np.ndarray], trainer: L.Trainer
    ) -> None:
        """One image per panel image, `val/panels/<image_id>`, at the global step (TensorBoard's x-axis for the
        run's scalars too); its slider then steps through the epochs of each image."""
        for image_id, panel in zip(image_ids, panels, strict=True):
            logger.experiment.add_image(f"{PANEL_KEY}/{image_id}", panel, trainer.global_step, dataformats="HWC")

    def prm_dtype(self, trainer_precision: str) -> torch.dtype:
        """The dtype of the panels' peak backprop for a run that trains in `trainer_precision` ("bf16-mixed")."""
        if self.precision != AUTO_PRECISION:
            return PRM_PRECISIONS[self.precision]
        return PRM_PRECISIONS["bf16" if trainer_precision.startswith("bf16") else "fp32"]

    def render(
        self, pl_module: Any, batch: dict[str, Any], prm_dtype: torch.dtype = torch.float32, pad: bool = True
    ) -> tuple[list[np.ndarray], list[str]]:
        """Panels (H', W', 3) uint8 and captions for a collated batch of validation samples; `pad`: each padded to
        the run's panel size (`canvas_hw`), else at its own size.

        The samples carry their original pixels (`raw_image`), so nothing is read from disk again.
        """
        raw_images = batch["raw_image"]
        if any(raw is None for raw in raw_images):
            raise ValueError("panel samples must carry `raw_image` (the validation set is built with instances)")
        was_training = pl_module.training
        try:
            predictions = pl_module.predict_images(
                batch["image"].to(pl_module.device),
                batch["orig_size"],
                raw_images,
                with_attention=True,
                prm_dtype=prm_dtype,
                with_prms=True,
            )
        finally:
            pl_module.train(was_training)
        panels, captions = [], []
        for b, prediction in enumerate(predictions):
            inputs = panel_inputs(prediction, raw_images[b], batch["targets"][b], pl_module.class_names)
            panels.append(render_panel(inputs, max_prms=self.max_prms, tile_size=self.tile_size,
                                       display_score=self.display_score, prm_scale=self.prm_scale))  # fmt: skip
            captions.append(panel_caption(inputs, image_id=batch["image_id"][b]))
        if not pad:
            return panels, captions
        num_attention = max((len(p.attention or ()) for p in predictions), default=0)
        largest = largest_layout([raw.shape[:2] for raw in raw_images], pl_module.class_names, num_attention,
                                 self.max_prms, self.tile_size).size  # fmt: skip
        sizes = [largest, *(p.shape[:2] for p in panels), *([self.canvas_hw] if self.canvas_hw else [])]
        canvas = (max(h for h, _ in sizes), max(w for _, w in sizes))
        if self.canvas_hw is not None and canvas != self.canvas_hw:
            log.info("panels grow from %s to %s px: a panel is busier than the run's largest so far",
                     self.canvas_hw, canvas)  # fmt: skip
        self.canvas_hw = canvas
        background = PanelStyle().background
        return [pad_to(panel, canvas, background) for panel in panels], captions


def panel_inputs(
    prediction: ImagePrediction, raw_image: np.ndarray, targets: InstanceTargets | None, class_names: Sequence[str]
) -> PanelInputs:
    """What one image's panel shows: its original pixels, the prediction's maps and peaks, its GT when known.

    The PRM row gets every valid peak's own PRM (`prediction.prms`), not the instances' maps, which NMS merged,
    at its own magnitude (`prm_maxima`: retrieval's copies are each scaled to [0, 1]), so that on the panel's shared
    scale a weak map looks weak. COCO's crowd regions are not drawn as instances, as VOC's void is not drawn.
    """
    if targets is not None and targets.iscrowd is not None and bool(targets.iscrowd.any()):
        keep = ~targets.iscrowd.bool()
        targets = InstanceTargets(targets.masks[keep], targets.labels[keep], targets.void)
    prms = prediction.prms
    if prms is not None and prediction.prm_maxima is not None:
        prms = prms * prediction.prm_maxima.to(prms.dtype)[:, None, None]
    return PanelInputs(
        image=raw_image,
        class_names=class_names,
        crms=prediction.crms,
        valid_classes=prediction.valid_classes,
        peaks=prediction.peaks,
        prms=prms,
        instances=prediction.instances,
        gt_masks=targets.masks if targets is not None else None,
        gt_labels=targets.labels if targets is not None else None,
        attention=prediction.attention or None,
        class_scores=prediction.class_logits,
    )
