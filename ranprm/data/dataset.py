"""A torch Dataset over the ids of an annotation source (VOC layout, COCO format; `ranprm.data.source`): transformed
image, image-level labels and (optionally) GT instances."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ranprm.data.sampling import SampleKey
from ranprm.data.source import AnnotationSource, VOCSource
from ranprm.data.voc import InstanceTargets, image_labels, read_image
from ranprm.errors import DataError

log = logging.getLogger(__name__)

Sample = dict[str, Any]


class VOCDataset(Dataset[Sample | None]):
    """Samples `{"image", "labels", "image_id", "orig_size", "targets", "objects"}`.

    `image` is the transformed float tensor (3, S, S); `targets` holds GT instances at the *original* size (None
    when not asked for or when the image has no segmentation), because instance metrics are computed at the
    original resolution, as VOC does.

    Labels are read for every id up front: a bad annotation then stops the run before anything is trained or
    written.
    """

    def __init__(
        self,
        root: Path,
        ids: list[str],
        class_names: tuple[str, ...],
        transform: v2.Transform,
        difficult_as_positive: bool = True,
        with_instances: bool = False,
        skip_bad_images: bool = False,
        source: AnnotationSource | None = None,
    ) -> None:
        """`source`: where ids, objects and masks come from; None: the VOC-layout folder `root`."""
        self.root, self.ids, self.class_names = root, ids, class_names
        self.source = source if source is not None else VOCSource(root, class_names)
        self.transform = transform
        self.with_instances = with_instances
        self.skip_bad_images = skip_bad_images
        # The parsed objects are kept: evaluation reads their boxes (the pointing game) without parsing again.
        self.objects = [self.source.objects(i) for i in ids]
        self.labels = torch.stack([image_labels(o, class_names, difficult_as_positive) for o in self.objects])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | SampleKey) -> Sample | None:
        """`key`: an index, or `(index, seed)` from `EpochSampler`; the seed fixes this image's random augmentation,
        so it does not depend on the worker or on what ran before (an exact resume)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        image_id = self.ids[index]
        try:
            image = read_image(self.source.image_path(image_id))
        except DataError as err:
            if not self.skip_bad_images:
                raise DataError(f"{err}; replace it, or set data.skip_bad_images=true to skip such images") from err
            log.warning("skipping %s", err)
            return None  # dropped by `collate`, which counts it
        orig_size = (int(image.shape[1]), int(image.shape[2]))
        targets: InstanceTargets | None = None
        if self.with_instances:
            targets = self.source.instance_targets(image_id, orig_size)
        return {
            # the original pixels, for proposal-based retrieval and panels (evaluation samples only)
            "raw_image": image.permute(1, 2, 0).numpy() if self.with_instances else None,
            "image": self._transform(image, seed),
            "labels": self.labels[index],
            "image_id": image_id,
            "orig_size": orig_size,
            "targets": targets,
            "objects": self.objects[index] if self.with_instances else None,  # boxes for evaluation
        }

    def _transform(self, image: torch.Tensor, seed: int | None) -> torch.Tensor:
        if seed is None:
            return self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        with torch.random.fork_rng(devices=[]):  # the global generator is left as it was
            torch.manual_seed(seed)
            return self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)


def collate(samples: list[Sample | None]) -> dict[str, Any]:
    """Stack images and labels; keep ids, sizes and targets as lists. Skipped (None) samples are counted."""
    kept = [s for s in samples if s is not None]
    batch: dict[str, Any] = {"skipped": len(samples) - len(kept)}
    if not kept:
        return batch
    batch["image"] = torch.stack([s["image"] for s in kept])
    batch["labels"] = torch.stack([s["labels"] for s in kept])
    for key in ("image_id", "orig_size", "targets", "raw_image", "objects"):
        batch[key] = [s[key] for s in kept]
    return batch
