"""The LightningDataModule: one code path for real VOC 2012, COCO-format sets and the embedded synthetic dataset
(`data.format` picks the annotation source, `ranprm.data.source`).

Robustness (issue 18): every `DataConfig` value is type- and range-checked before anything is read; `setup()` checks
split ids, annotations and the evaluated split's mask headers before the first step; the training order and flips
are functions of (seed, epoch, image) and the loader's position is saved in checkpoints, so a resumed run trains on
exactly the batches the uninterrupted one would have (`ranprm.data.sampling`); workers ignore SIGTERM; and
`num_workers` is capped at the cores this process may use.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader

from ranprm.data import coco, voc
from ranprm.data.dataset import VOCDataset, collate
from ranprm.data.sampling import EpochSampler, ResumableDataLoader, worker_init
from ranprm.data.source import AnnotationSource, VOCSource
from ranprm.data.transforms import build_transform
from ranprm.errors import ConfigError
from ranprm.utils.checks import check_dataclass_types, check_mapping_for, check_range

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask under SLURM or taskset), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


@dataclass
class DataConfig:
    """What `conf/data/*.yaml` holds. `root: null` means the embedded synthetic dataset (generated on demand)."""

    name: str = "synthetic"
    root: str | None = None
    class_names: list[str] | None = None  # voc only; null: VOC's 20 classes, or the synthetic ones
    image_size: int = 448
    flip_prob: float = 0.5
    train_split: str = "train"  # voc: ImageSets/Main/<train_split>.txt; coco: annotations/instances_<split>.json
    train_fraction: float = 1.0  # the first fraction of the split, in file order (the RAN-PRM paper uses 0.2)
    holdout_fraction: float = 0.0  # > 0: validate on the last part of the (cut) training ids instead of val_split
    val_task: str = "Segmentation"  # ImageSets/<val_task>/<val_split>.txt: instance masks live there in VOC
    val_split: str = "val"  # coco: annotations/instances_<val_split>.json, every image of it scored
    difficult_as_positive: bool = True
    skip_bad_images: bool = False
    batch_size: int = 8
    val_batch_size: int | None = None
    num_workers: int = 2
    pin_memory: bool = True
    persistent_workers: bool = True
    synthetic: dict[str, Any] = field(default_factory=dict)  # SyntheticSpec fields for the embedded dataset
    cache_dir: str | None = None
    format: str = "voc"  # voc: VOC 2012 layout (also the synthetic data) | coco: COCO-format JSON (ranprm.data.coco)
    classes: Any = None  # coco only: voc | all | a list of COCO category names

    @classmethod
    def from_config(cls, cfg: Any) -> DataConfig:
        known = set(cls.__dataclass_fields__)
        values = dict(cfg)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"data.{unknown[0]} is not a data option; known options: {sorted(known)}")
        data = cls(**values)
        data.validate()
        return data

    def validate(self) -> None:
        """One line naming the option for any value of the wrong type or out of range; nothing is read here."""
        check_dataclass_types(self, "data")
        check_range(self.image_size, "data.image_size", low=1)
        check_range(self.flip_prob, "data.flip_prob", low=0.0, high=1.0)
        check_range(self.train_fraction, "data.train_fraction", low=0.0, high=1.0, low_open=True)
        check_range(self.holdout_fraction, "data.holdout_fraction", low=0.0, high=1.0, high_open=True)
        check_range(self.batch_size, "data.batch_size", low=1)
        check_range(self.val_batch_size, "data.val_batch_size", low=1)
        check_range(self.num_workers, "data.num_workers", low=0)
        for option in ("name", "train_split", "val_task", "val_split"):
            if not getattr(self, option).strip():
                raise ConfigError(f"data.{option} is empty; give a name")
        if self.format not in FORMATS:
            raise ConfigError(f"data.format={self.format!r} is not valid; choose one of {', '.join(FORMATS)}")
        if self.format == "coco":
            self._validate_coco()
        elif self.classes is not None:
            raise ConfigError(
                f"data.classes is an option of data.format=coco; data.format={self.format} takes data.class_names"
            )
        if self.root is None:  # the embedded dataset: its spec's values, before anything is generated
            from ranprm.data.synthetic import SyntheticSpec

            check_mapping_for(SyntheticSpec, self.synthetic, "data.synthetic")
        if self.class_names is not None:
            if len(set(self.class_names)) != len(self.class_names):
                raise ConfigError(f"data.class_names={self.class_names} lists a class twice")
            if self.class_names and not all(n.strip() for n in self.class_names):
                raise ConfigError(f"data.class_names={self.class_names} has an empty name")

    def _validate_coco(self) -> None:
        if self.root is None:
            raise ConfigError("data.format=coco needs data.root, the folder holding annotations/ and the images")
        if self.class_names is not None:
            raise ConfigError("data.class_names is a VOC-layout option; data.format=coco keeps data.classes")
        if self.val_task != DataConfig.val_task:
            raise ConfigError(
                f"data.val_task={self.val_task!r} is a VOC-layout option (ImageSets/<task>); data.format=coco scores "
                "annotations/instances_<data.val_split>.json"
            )
        if not self.difficult_as_positive:
            raise ConfigError("data.difficult_as_positive is a VOC-layout option; COCO has no difficult objects")
        coco.check_classes_option(self.classes)


FORMATS = ("voc", "coco")


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
        return f"held-out {cfg.holdout_fraction:g} of {split_name(cfg, cfg.train_split, 'Main')}", False
    return split_name(cfg, cfg.val_split, cfg.val_task), True


def split_name(cfg: DataConfig, split: str, task: str) -> str:
    """How messages and records name a split: `Segmentation/val` (VOC layout), `instances_val2017` (COCO)."""
    return f"instances_{split}" if cfg.format == "coco" else f"{task}/{split}"


class VOCDataModule(L.LightningDataModule):
    """`seed`: the training order and flips of epoch e are drawn from `seed` and e alone (an exact resume); None
    takes the seed `lightning.seed_everything` set (`PL_GLOBAL_SEED`), else 0."""

    def __init__(self, cfg: DataConfig, seed: int | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.seed = int(seed if seed is not None else os.environ.get("PL_GLOBAL_SEED", 0))
        self.num_workers = self._capped_workers(cfg.num_workers)
        self.root = self._resolve_root()
        self.source: AnnotationSource = self._source()
        self.class_names: tuple[str, ...] = self.source.class_names
        self.train_set: VOCDataset | None = None
        self.val_set: VOCDataset | None = None
        self._train_sampler: EpochSampler | None = None
        self._resume_position: dict[str, int] | None = None  # from a checkpoint, applied by train_dataloader()

    @staticmethod
    def _capped_workers(requested: int) -> int:
        """More workers than usable cores only compete with the training process (and PyTorch warns each run)."""
        cores = usable_cores()
        if requested > cores:
            log.info("data.num_workers=%d capped at %d, the CPU cores this process may use", requested, cores)
            return cores
        return requested

    def _resolve_root(self) -> Path:
        if self.cfg.root is None:
            from ranprm.data.synthetic import SyntheticSpec, ensure_dataset

            return ensure_dataset(SyntheticSpec(**self.cfg.synthetic), cache_dir=self.cfg.cache_dir)
        return (coco.check_root if self.cfg.format == "coco" else voc.check_root)(self.cfg.root)

    def _source(self) -> AnnotationSource:
        cfg = self.cfg
        if cfg.format == "coco":
            # Only the evaluated split keeps its polygons and RLEs (a hold-out validates on training images).
            evaluated = cfg.train_split if cfg.holdout_fraction > 0 else cfg.val_split
            return coco.COCOSource(self.root, cfg.classes, mask_splits=[evaluated],
                                   skip_bad_images=cfg.skip_bad_images)  # fmt: skip
        if cfg.class_names:
            return VOCSource(self.root, tuple(cfg.class_names))
        if cfg.root is None:
            from ranprm.data.synthetic import CLASS_NAMES

            return VOCSource(self.root, tuple(CLASS_NAMES))
        return VOCSource(self.root, voc.VOC_CLASSES)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split_ids(self) -> tuple[list[str], list[str]]:
        """(train ids, validation ids) after the fraction and hold-out rules."""
        cfg = self.cfg
        train_ids = self.source.split_ids(cfg.train_split, "Main", training=True)
        train = split_ids(train_ids, cfg.train_fraction, "data.train_fraction")
        if cfg.holdout_fraction > 0:
            if not cfg.holdout_fraction < 1.0 or len(train) < 2:
                raise ConfigError(
                    f"data.holdout_fraction={cfg.holdout_fraction} must lie in [0, 1) and leave training images"
                )
            n_val = max(1, round(len(train) * cfg.holdout_fraction))
            if n_val >= len(train):
                raise ConfigError(
                    f"data.holdout_fraction={cfg.holdout_fraction} holds out all {len(train)} training images of "
                    f"Main/{cfg.train_split} (after data.train_fraction); lower it so that some are left to train on"
                )
            return train[:-n_val], train[-n_val:]
        return train, self.source.split_ids(cfg.val_split, cfg.val_task, training=False)

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
            source=self.source,
        )

    def check_val_masks(self, val_ids: list[str]) -> int:
        """Check the evaluated images' mask headers now (see `check_masks`); VOC's Segmentation splits must have
        masks for every image, a hold-out from a Main split need not. Returns the number of images with masks."""
        cfg = self.cfg
        required = cfg.val_task == "Segmentation" and cfg.holdout_fraction == 0
        name = (f"ImageSets/{cfg.val_task}/{cfg.val_split}.txt" if cfg.format == "voc"
                else f"annotations/instances_{cfg.val_split}.json")  # fmt: skip
        name = name if cfg.holdout_fraction == 0 else "(hold-out)"
        return self.source.check_masks(val_ids, split_name=name, required=required)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_ids, val_ids = self.split_ids()
        self.check_val_masks(val_ids)
        self.train_set = self._dataset(train_ids, train=True)
        self.val_set = self._dataset(val_ids, train=False)

    def _worker_init(self) -> Any:
        """Workers ignore SIGTERM, then seed themselves as Lightning would (`seed_everything(workers=True)`); setting
        `worker_init_fn` stops Lightning adding its own, so its seeding is chained here."""
        if os.environ.get("PL_SEED_WORKERS") == "1":
            rank = self.trainer.global_rank if self.trainer is not None else 0
            return functools.partial(worker_init, chained=functools.partial(pl_worker_init_function, rank=rank))
        return worker_init

    def _loader_args(self) -> dict[str, Any]:
        workers = self.num_workers
        return {
            "num_workers": workers,
            "collate_fn": collate,
            "pin_memory": self.cfg.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.cfg.persistent_workers and workers > 0,
            "worker_init_fn": self._worker_init() if workers > 0 else None,
            "drop_last": False,
        }

    def _train_batches_done(self) -> int:
        """Batches of the current epoch already trained (saved with the loader's state in each checkpoint)."""
        if self.trainer is None:
            return 0
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: where the training order stands (see `ranprm.data.sampling`)."""
        if self._train_sampler is None:
            return {}
        return {"train_position": {"epoch": int(self._train_sampler.epoch), "batches_done": self._train_batches_done()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restored before the trainer builds the loaders (`train_dataloader` applies it)."""
        self._resume_position = state_dict.get("train_position")

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        trainer = self.trainer
        sampler = EpochSampler(
            self.train_set,
            seed=self.seed,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
        )
        if self._resume_position is not None:
            position, self._resume_position = self._resume_position, None
            sampler.resume_at(position["epoch"], position["batches_done"], self.cfg.batch_size)
        elif trainer is not None:  # a checkpoint of an older ranprm still resumes in its own epoch's order
            sampler.set_epoch(trainer.current_epoch)
        self._train_sampler = sampler
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            batches_done=self._train_batches_done,
            **self._loader_args(),
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(
            self.val_set,
            batch_size=self.cfg.val_batch_size or self.cfg.batch_size,
            shuffle=False,
            **self._loader_args(),
        )
