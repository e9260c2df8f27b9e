"""The LightningModule: wires the network, peak stimulation, loss, optimiser and validation metrics.

It holds no algorithm of its own: peaks and scores come from `ranprm.prm.peaks`, instance inference from
`ranprm.inference`, metrics from torchmetrics and `ranprm.eval`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MultilabelAveragePrecision

from ranprm.errors import ConfigError, RanprmError
from ranprm.models.prm_net import PRMNet
from ranprm.prm.peaks import class_scores


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
    ) -> None:
        super().__init__()
        # Everything needed to rebuild the model from a checkpoint alone (ranprm-predict / ranprm-evaluate).
        self.save_hyperparameters()
        self.class_names = list(class_names)
        self.model = PRMNet.from_config(backbone, len(class_names))
        self.loss_fn = nn.MultiLabelSoftMarginLoss()
        self.val_cls_map = MultilabelAveragePrecision(num_labels=len(class_names), average="macro")

    def forward(self, images: Tensor) -> Tensor:
        """Class response maps (B, C, h, w)."""
        return self.model(images)

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

    def on_validation_epoch_end(self) -> None:
        self.log("val/cls_map", self.val_cls_map.compute(), prog_bar=True)
        self.val_cls_map.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cfg = dict(self.hparams.optimizer)
        name = cfg.pop("name")
        mult = float(cfg.pop("backbone_lr_mult", 1.0))
        lr = float(cfg["lr"])
        groups = [
            {"params": self.model.backbone.parameters(), "lr": lr * mult},
            {"params": self.model.classifier.parameters(), "lr": lr},
        ]
        if name == "sgd":
            return torch.optim.SGD(groups, **cfg)
        if name == "adam":
            return torch.optim.Adam(groups, **cfg)
        if name == "adamw":
            return torch.optim.AdamW(groups, **cfg)
        raise ConfigError(f"optimizer.name={name!r} is unknown; choose sgd, adam or adamw")
