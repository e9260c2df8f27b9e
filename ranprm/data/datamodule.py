"""The LightningDataModule: one code path for real VOC 2012 and the embedded synthetic dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from ranprm.data.dataset import VOCDataset, collate
from ranprm.data.transforms import build_transform
from ranprm.data.voc import VOC_CLASSES, check_root, read_split
from ranprm.errors import ConfigError


@dataclass
class DataConfig:
    """What `conf/data/*.yaml` holds. `root: null` means the embedded synthetic dataset (generated on demand)."""

    name: str = "synthetic"
    root: str | None = None
    class_names: list[str] | None = None  # null: VOC's 20 classes, or the synthetic ones
    image_size: int = 448
    flip_prob: float = 0.5
    train_split: str = "train"  # ImageSets/Main/<train_split>.txt
    train_fraction: float = 1.0  # the first fraction of the split, in file order (the seed uses 0.2)
    holdout_fraction: float = 0.0  # > 0: validate on the last part of the (cut) training ids instead of val_split
    val_task: str = "Segmentation"  # ImageSets/<val_task>/<val_split>.txt: instance masks live there in VOC
    val_split: str = "val"
    difficult_as_positive: bool = True
    skip_bad_images: bool = False
    batch_size: int = 8
    val_batch_size: int | None = None
    num_workers: int = 2
    pin_memory: bool = True
    persistent_workers: bool = True
    synthetic: dict[str, Any] = field(default_factory=dict)  # SyntheticSpec fields for the embedded dataset
    cache_dir: str | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> DataConfig:
        known = set(cls.__dataclass_fields__)
        values = dict(cfg)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"data.{unknown[0]} is not a data option; known options: {sorted(known)}")
        return cls(**values)


def split_ids(ids: list[str], fraction: float, option: str) -> list[str]:
    """The first `fraction` of `ids` (at least one), deterministic because it keeps file order."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"{option}={fraction} must lie in (0, 1]")
    return ids[: max(1, round(len(ids) * fraction))]


def validation_split(data: Any) -> tuple[str, bool]:
    """What training validates on, from a DataConfig or a VOCDataModule: (a description, whether it is the split
    ranprm-evaluate scores).

    With `data.holdout_fraction > 0` validation uses held-out training images; otherwise it uses
    `<val_task>/<val_split>`, the evaluated split (no checkpoint is selected and no threshold calibrated on it
    without saying so). Anything else counts as unknown, and as the evaluated split.
    """
    cfg = data if isinstance(data, DataConfig) else getattr(data, "cfg", None)
    if not isinstance(cfg, DataConfig):
        return "the validation loader", True
    if cfg.holdout_fraction > 0:
        return f"held-out {cfg.holdout_fraction:g} of Main/{cfg.train_split}", False
    return f"{cfg.val_task}/{cfg.val_split}", True


class VOCDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.root = self._resolve_root()
        self.class_names: tuple[str, ...] = self._class_names()
        self.train_set: VOCDataset | None = None
        self.val_set: VOCDataset | None = None

    def _resolve_root(self) -> Path:
        if self.cfg.root is None:
            from ranprm.data.synthetic import SyntheticSpec, ensure_dataset

            return ensure_dataset(SyntheticSpec(**self.cfg.synthetic), cache_dir=self.cfg.cache_dir)
        return check_root(self.cfg.root)

    def _class_names(self) -> tuple[str, ...]:
        if self.cfg.class_names:
            return tuple(self.cfg.class_names)
        if self.cfg.root is None:
            from ranprm.data.synthetic import CLASS_NAMES

            return tuple(CLASS_NAMES)
        return VOC_CLASSES

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split_ids(self) -> tuple[list[str], list[str]]:
        """(train ids, validation ids) after the fraction and hold-out rules."""
        cfg = self.cfg
        train = split_ids(read_split(self.root, "Main", cfg.train_split), cfg.train_fraction, "data.train_fraction")
        if cfg.holdout_fraction > 0:
            if not cfg.holdout_fraction < 1.0 or len(train) < 2:
                raise ConfigError(
                    f"data.holdout_fraction={cfg.holdout_fraction} must lie in [0, 1) and leave training images"
                )
            n_val = max(1, round(len(train) * cfg.holdout_fraction))
            return train[:-n_val], train[-n_val:]
        return train, read_split(self.root, cfg.val_task, cfg.val_split)

    def _dataset(self, ids: list[str], train: bool) -> VOCDataset:
        cfg = self.cfg
        return VOCDataset(
            self.root,
            ids,
            self.class_names,
            build_transform(cfg.image_size, train=train, flip_prob=cfg.flip_prob),
            difficult_as_positive=cfg.difficult_as_positive,
            with_instances=not train,
            skip_bad_images=cfg.skip_bad_images,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_ids, val_ids = self.split_ids()
        self.train_set = self._dataset(train_ids, train=True)
        self.val_set = self._dataset(val_ids, train=False)

    def _loader(self, dataset: VOCDataset, batch_size: int, shuffle: bool) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.cfg.persistent_workers and workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return self._loader(self.train_set, self.cfg.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return self._loader(self.val_set, self.cfg.val_batch_size or self.cfg.batch_size, shuffle=False)
