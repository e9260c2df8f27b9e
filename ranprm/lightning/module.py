"""The LightningModule: wires the network, peak stimulation, loss, optimiser and validation metrics.

It holds no algorithm of its own: peaks and scores come from `ranprm.prm.peaks`, instance inference from
`ranprm.prm.pipeline`, metrics from torchmetrics and `ranprm.eval`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MultilabelAveragePrecision

from ranprm.errors import ConfigError, RanprmError
from ranprm.eval import GroundTruth, InstanceEvaluator, Peaks, scalar_metrics
from ranprm.lightning.callbacks import due_this_epoch
from ranprm.models.prm_net import PRMNet
from ranprm.prm.peaks import class_scores
from ranprm.prm.pipeline import ImagePrediction, InferenceConfig, predict_batch


class NonFiniteLossError(RanprmError):
    """Training produced a NaN or infinite loss."""


class PRMModule(L.LightningModule):
    def __init__(
        self,
        class_names: list[str],
        backbone: dict[str, Any],
        head: dict[str, Any],
        optimizer: dict[str, Any],
        threshold: dict[str, Any] | None = None,
        prm: dict[str, Any] | None = None,
        retrieval: dict[str, Any] | None = None,
        eval: dict[str, Any] | None = None,  # noqa: A002  (the config group's name)
        image_size: int | None = None,  # the training input size, so predict can use the same one
        channels_last: bool = False,  # NHWC weights and inputs (faster convolutions); results are unchanged
        compile: bool = False,  # noqa: A002  torch.compile the network for the training/validation forward
    ) -> None:
        super().__init__()
        # Everything needed to rebuild the model from a checkpoint alone (ranprm-predict / ranprm-evaluate).
        self.save_hyperparameters()
        self.class_names = list(class_names)
        self.model = PRMNet.from_config(backbone, len(class_names))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Later .to(device) and load_state_dict keep this layout, so checkpoints need no conversion.
        self.model.to(memory_format=self.memory_format)
        # The compiled wrapper shares the network's parameters. It lives in a plain dict, not as a submodule, so
        # checkpoints keep the network's own keys, and peak backprop (which patches convolutions) keeps using the
        # eager network.
        self._compiled: dict[str, nn.Module] = {"model": torch.compile(self.model)} if compile else {}
        self.loss_fn = nn.MultiLabelSoftMarginLoss()
        self.val_cls_map = MultilabelAveragePrecision(num_labels=len(class_names), average="macro")
        self.instance_evaluator = InstanceEvaluator(self.class_names)
        self.last_instance_metrics: dict[str, Any] = {}
        self._instance_images_seen = 0

    def forward(self, images: Tensor) -> Tensor:
        """Class response maps (B, C, h, w)."""
        network = self._compiled.get("model", self.model)
        return network(images.contiguous(memory_format=self.memory_format))

    def class_logits(self, crms: Tensor) -> Tensor:
        head = self.hparams.head
        return class_scores(
            crms,
            stimulation=head["stimulation"],
            window=head["window"],
            peak_filter=head["peak_filter"],
            sub_pixel_factor=head["sub_pixel_factor"],
            full_peak_gradient=head["full_peak_gradient"],
        )

    def inference_config(self) -> InferenceConfig:
        hp = self.hparams
        return InferenceConfig.from_config(hp.threshold, hp.head, hp.prm, hp.retrieval)

    def predict_images(
        self,
        images: Tensor,
        orig_sizes: list[tuple[int, int]],
        raw_images: list[Any] | None = None,
        stage_times: dict[str, float] | None = None,
        with_attention: bool = False,
        prm_dtype: torch.dtype | None = None,
    ) -> list[ImagePrediction]:
        """Instances at the original sizes for network inputs `images (B, 3, S, S)`; see `ranprm.prm.pipeline`.
        `prm_dtype` replaces `prm.precision` for this call (the panels backpropagate in bf16)."""
        self.eval()
        cfg = self.inference_config()
        if prm_dtype is not None:
            cfg = dataclasses.replace(cfg, prm_dtype=prm_dtype)
        # Autocast is off even inside a bf16-mixed validation step: PRM's custom backward would mix bf16
        # activations with fp32 weights, and instance maps should not depend on the training precision. A bf16
        # backprop is asked for explicitly (`prm.precision`), and then runs on bf16 weights throughout.
        with torch.autocast(device_type=images.device.type, enabled=False):
            return predict_batch(
                self.model,
                images.float().contiguous(memory_format=self.memory_format),
                orig_sizes,
                cfg,
                self.class_logits,
                raw_images,
                stage_times,
                with_attention,
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        if "image" not in batch:
            return None  # every image of this batch was skipped as unreadable
        logits = self.class_logits(self(batch["image"]))
        loss = self.loss_fn(logits, batch["labels"])
        # One device->host sync per step is the price of never training on from a NaN: the run stops with the
        # step and images named, and the last checkpoint written before it stays the last good one.
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at global step {self.global_step} (batch {batch_idx}, images "
                f"{batch['image_id'][:4]}...); lower optimizer.lr or check the data; the last good checkpoint is kept"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "image" not in batch:
            return
        logits = self.class_logits(self(batch["image"]))
        self.log("val/loss", self.loss_fn(logits, batch["labels"]), prog_bar=True, batch_size=len(logits))
        self.val_cls_map.update(torch.sigmoid(logits), batch["labels"].long())
        if self._instance_eval_this_epoch():
            self._update_instance_metrics(batch)

    def _instance_eval_this_epoch(self) -> bool:
        """Instance metrics cost a PRM backward per peak: every `eval.every_n_epochs`, default the last epoch."""
        return due_this_epoch(self.trainer, (self.hparams.eval or {}).get("every_n_epochs"))

    def _update_instance_metrics(self, batch: dict[str, Any]) -> None:
        cap = (self.hparams.eval or {}).get("max_images")
        keep = [i for i, t in enumerate(batch["targets"]) if t is not None]
        if cap is not None:
            keep = keep[: max(0, int(cap) - self._instance_images_seen)]
        if not keep:
            return
        self._instance_images_seen += len(keep)
        predictions = self.predict_images(
            batch["image"][keep], [batch["orig_size"][i] for i in keep], [batch["raw_image"][i] for i in keep]
        )
        self.instance_evaluator.update(
            [p.instances for p in predictions],
            [GroundTruth(batch["image_id"][i], t.masks, t.labels, t.void) for i, t in
             ((i, batch["targets"][i]) for i in keep)],
            peaks=[Peaks(yx=p.peaks[:, 1:], labels=p.peaks[:, 0].long()) for p in predictions],
        )  # fmt: skip

    def on_validation_epoch_end(self) -> None:
        self.log("val/cls_map", self.val_cls_map.compute(), prog_bar=True)
        self.val_cls_map.reset()
        if self._instance_images_seen:
            self.last_instance_metrics = self.instance_evaluator.compute()
            for key, value in scalar_metrics(self.last_instance_metrics).items():
                if key.startswith(("map_r", "abo", "pointing")):
                    self.log(f"val/{key}", float(value))
        self.instance_evaluator.reset()
        self._instance_images_seen = 0

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer over two groups: the backbone's trunk at `lr * backbone_lr_mult` (PRM's recipe
        fine-tunes an ImageNet trunk at 0.01x) and the new layers at `lr`: the classifier and whatever the backbone
        adds on top of its trunk (`added_modules()`: attention branches on a pretrained trunk)."""
        cfg = dict(self.hparams.optimizer)
        name = cfg.pop("name")
        mult = float(cfg.pop("backbone_lr_mult", 1.0))
        cfg.pop("scheduler", None)
        lr = float(cfg["lr"])
        added = getattr(self.model.backbone, "added_modules", None)
        new = {id(p) for m in (added() if added else []) for p in m.parameters()}
        trunk = [p for p in self.model.backbone.parameters() if id(p) not in new]
        fresh = [p for p in self.model.backbone.parameters() if id(p) in new]
        groups = [
            {"params": trunk, "lr": lr * mult},
            {"params": [*fresh, *self.model.classifier.parameters()], "lr": lr},
        ]
        optimizers = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        if name not in optimizers:
            raise ConfigError(f"optimizer.name={name!r} is unknown; choose sgd, adam or adamw")
        return optimizers[name](groups, **cfg)

    def configure_optimizers(self) -> Any:
        schedule = self.hparams.optimizer.get("scheduler") or "none"
        optimizer = self.build_optimizer()
        if schedule == "none":
            return optimizer
        if schedule != "cosine":
            raise ConfigError(f"optimizer.scheduler={schedule!r} is unknown; choose none or cosine")
        # Per step, down to 0 at the last step of the run: short from-scratch runs end on a settled model
        # instead of wherever the last large step left it.
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}
