"""Annotation sources: what the dataset and the DataModule need of an annotated image folder, one class per layout
(`data.format`): `VOCSource` (PASCAL VOC 2012 layout, also the embedded synthetic data) and
`ranprm.data.coco.COCOSource` (COCO-format JSON). The dataset, the DataModule and `ranprm-evaluate` keep one code
path and ask the source for ids, image paths, objects and instance masks.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ranprm.data.voc import (
    InstanceTargets,
    ObjectAnnotation,
    check_masks,
    image_path,
    read_annotation,
    read_instance_masks,
    read_split,
)

if TYPE_CHECKING:
    from ranprm.eval.results_io import ResultIds


class AnnotationSource(abc.ABC):
    """Image ids of a split, their image files, objects (labels and boxes) and instance masks."""

    root: Path
    class_names: tuple[str, ...]

    @abc.abstractmethod
    def split_ids(self, split: str, task: str, training: bool) -> list[str]:
        """The image ids of a split, in file order. `task`: VOC's ImageSets/<task> folder (others ignore it);
        `training`: the ids trained on (a source may leave out images with nothing to learn from)."""

    @abc.abstractmethod
    def split_name(self, split: str, task: str) -> str:
        """How messages and records name a split (`Segmentation/val`, `instances_val2017`)."""

    @abc.abstractmethod
    def image_path(self, image_id: str) -> Path: ...

    @abc.abstractmethod
    def objects(self, image_id: str) -> list[ObjectAnnotation]:
        """The objects behind the image-level labels, with their boxes (the pointing game)."""

    @abc.abstractmethod
    def instance_targets(self, image_id: str, image_size: tuple[int, int]) -> InstanceTargets | None:
        """GT instances at the original size; None for an image without instance annotation."""

    @abc.abstractmethod
    def check_masks(self, ids: Sequence[str], split_name: str, required: bool) -> int:
        """Check what the evaluated images' masks need without decoding them; returns the number with masks."""

    def result_ids(self) -> ResultIds | None:
        """How a results file names this data's images and classes; None: ranprm's own (stems, 1-based ids)."""
        return None


class VOCSource(AnnotationSource):
    """A folder in VOC 2012 layout (`ranprm.data.voc`)."""

    def __init__(self, root: Path, class_names: tuple[str, ...]) -> None:
        self.root, self.class_names = root, class_names

    def split_ids(self, split: str, task: str, training: bool) -> list[str]:
        return read_split(self.root, task, split)

    def split_name(self, split: str, task: str) -> str:
        return f"{task}/{split}"

    def image_path(self, image_id: str) -> Path:
        return image_path(self.root, image_id)

    def objects(self, image_id: str) -> list[ObjectAnnotation]:
        return read_annotation(self.root / "Annotations" / f"{image_id}.xml", self.class_names)

    def instance_targets(self, image_id: str, image_size: tuple[int, int]) -> InstanceTargets | None:
        return read_instance_masks(self.root, image_id, image_size)

    def check_masks(self, ids: Sequence[str], split_name: str, required: bool) -> int:
        return check_masks(self.root, list(ids), required=required, split_name=split_name)
