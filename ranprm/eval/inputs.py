"""What the evaluators consume, and the one place where it is built from a batch, a model's output or a file.

Every evaluator reads a `GroundTruth` and a `Prediction` per image. Both are built here and nowhere else:

- `eval_inputs(batch, class_names, predictions=... | class_logits=...)`: from a collated validation batch
  (`ranprm.data.dataset.collate`) and the model's `ImagePrediction`s or its class logits (training validation and
  `ranprm-evaluate ckpt=`);
- `ground_truth(...)` and `prediction_from_instances(...)`: from VOC files and a results file
  (`ranprm-evaluate predictions=`).

A field an image does not have is None (no segmentation, no class scores in a results file, ...): each evaluator
skips what it cannot score and says so by leaving its metric out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ranprm.prm.instances import Instances
from ranprm.prm.peaks import to_image_coordinates

if TYPE_CHECKING:
    from ranprm.data.voc import InstanceTargets, ObjectAnnotation
    from ranprm.prm.pipeline import ImagePrediction


@dataclass
class InstanceMasks:
    """Ground-truth instance masks of one image at its original size.

    masks:   (M, H, W) bool
    labels:  (M,) long  0-based class index
    void:    (H, W) bool  VOC's 255 pixels (object borders, difficult regions)
    iscrowd: (M,) bool  COCO's crowd regions (None: no crowd, as in VOC)
    """

    masks: Tensor
    labels: Tensor
    void: Tensor
    iscrowd: Tensor | None = None

    def __post_init__(self) -> None:
        if self.iscrowd is None:
            self.iscrowd = torch.zeros(self.labels.shape, dtype=torch.bool)
        if self.iscrowd.shape != self.labels.shape:
            raise ValueError(f"ground truth: iscrowd {tuple(self.iscrowd.shape)} does not match the labels")
        if self.masks.ndim != 3 or self.void.shape != self.masks.shape[1:]:
            raise ValueError(
                f"ground truth: masks {tuple(self.masks.shape)} must be (M, H, W) and void "
                f"{tuple(self.void.shape)} (H, W)"
            )
        if self.labels.shape != (self.masks.shape[0],):
            raise ValueError(f"ground truth: labels {tuple(self.labels.shape)} do not match the masks")


@dataclass
class Boxes:
    """Ground-truth boxes of one image (VOC `Annotations/<id>.xml`), in pixel indices.

    xyxy:      (K, 4) float  x0, y0, x1, y1: 0-based, inclusive (VOC writes 1-based); NaN for an object that has no
               box in its annotation
    labels:    (K,) long
    difficult: (K,) bool
    """

    xyxy: Tensor
    labels: Tensor
    difficult: Tensor


@dataclass
class GroundTruth:
    """What is known about one image. `image_size` is (H, W) at the original size."""

    image_id: str
    image_size: tuple[int, int]
    instances: InstanceMasks | None = None
    boxes: Boxes | None = None
    class_targets: Tensor | None = None  # (C,) 0/1 image-level labels (difficult objects as the data counts them)

    @cached_property
    def scored_instances(self) -> tuple[Tensor, Tensor]:
        """(masks (M', H, W) bool without their void pixels, labels (M',)) of the non-crowd instances that keep a
        pixel, with crowd regions as void (`void`): VOC's rule, which every protocol but COCO's crowd rule uses.

        Void is removed from ground truth in every protocol (chainercv's VOC masks never contain it). A GT instance
        left with no pixel cannot be matched by anything and is dropped (VOC never has one).
        """
        if self.instances is None:
            raise ValueError(f"image {self.image_id}: no instance masks")
        keep = ~self.void
        crowd = self.iscrowd
        masks = self.instances.masks.cpu().bool()[~crowd] & keep
        nonempty = masks.flatten(1).any(1)
        return masks[nonempty], self.instances.labels.cpu().long()[~crowd][nonempty]

    @property
    def iscrowd(self) -> Tensor:
        """(M,) bool: which of `instances` are crowd regions."""
        if self.instances is None:
            raise ValueError(f"image {self.image_id}: no instance masks")
        return self.instances.iscrowd.cpu().bool()  # type: ignore[union-attr]

    @property
    def void(self) -> Tensor:
        """(H, W) bool: VOC's void pixels and COCO's crowd regions, the pixels no IoU counts under VOC's rule."""
        if self.instances is None:
            raise ValueError(f"image {self.image_id}: no void map")
        void = self.instances.void.cpu().bool()  # a uint8 void would turn `~` into a bitwise not
        crowd = self.iscrowd
        if bool(crowd.any()):
            void = void | self.instances.masks.cpu().bool()[crowd].any(0)
        return void


@dataclass
class Prediction:
    """What a method says about one image.

    instances:    the predicted instances (masks at the original size), or None when the method made none
    peaks_yx:     (P, 2) float (y, x) image pixels of the peaks used for pointing accuracy, with peak_labels (P,)
    class_scores: (C,) image-level scores (logits); only their ranking matters
    class_max_yx: (C, 2) float (y, x) image pixels of each class map's maximum (the cell centre)
    """

    instances: Instances | None = None
    peaks_yx: Tensor | None = None
    peak_labels: Tensor | None = None
    class_scores: Tensor | None = None
    class_max_yx: Tensor | None = None


def check_pair(gt: GroundTruth, pred: Prediction, num_classes: int) -> None:
    """Raise ValueError when a prediction cannot be scored against its ground truth (sizes, label range)."""
    labels: list[tuple[str, Tensor]] = []
    if pred.instances is not None:
        size = tuple(pred.instances.masks.shape[1:])
        if size != tuple(gt.image_size):
            raise ValueError(f"image {gt.image_id}: predicted masks are {size}, ground truth {tuple(gt.image_size)}")
        labels.append(("predicted", pred.instances.labels))
    if gt.instances is not None:
        labels.append(("ground-truth", gt.instances.labels))
    for what, values in labels:
        if len(values) and not (int(values.min()) >= 0 and int(values.max()) < num_classes):
            raise ValueError(f"image {gt.image_id}: {what} label outside 0..{num_classes - 1}")
    if pred.instances is not None and not bool(torch.isfinite(pred.instances.scores).all()):
        raise ValueError(f"image {gt.image_id}: predicted scores must be finite to be ranked")
    for what, vector in (("class scores", pred.class_scores), ("class targets", gt.class_targets)):
        if vector is not None and vector.shape != (num_classes,):
            raise ValueError(f"image {gt.image_id}: {what} {tuple(vector.shape)} must be ({num_classes},)")


def boxes_from_objects(objects: Sequence[ObjectAnnotation], class_names: Sequence[str]) -> Boxes:
    """`Boxes` from parsed VOC objects (1-based inclusive boxes become 0-based pixel indices)."""
    xyxy = torch.tensor([o.box for o in objects], dtype=torch.float64).reshape(-1, 4) - 1
    no_box = torch.tensor([tuple(o.box) == (0, 0, 0, 0) for o in objects], dtype=torch.bool)
    xyxy[no_box] = float("nan")  # `read_annotation` writes (0, 0, 0, 0) for an object without <bndbox>
    return Boxes(
        xyxy=xyxy,
        labels=torch.tensor([list(class_names).index(o.name) for o in objects], dtype=torch.long),
        difficult=torch.tensor([o.difficult for o in objects], dtype=torch.bool),
    )


def ground_truth(
    image_id: str,
    image_size: tuple[int, int],
    class_names: Sequence[str],
    targets: InstanceTargets | None = None,
    objects: Sequence[ObjectAnnotation] | None = None,
    class_targets: Tensor | None = None,
) -> GroundTruth:
    """The `GroundTruth` of one image from what the VOC readers return (`read_instance_masks`, `read_annotation`)."""
    return GroundTruth(
        image_id=image_id,
        image_size=(int(image_size[0]), int(image_size[1])),
        instances=None
        if targets is None
        else InstanceMasks(targets.masks, targets.labels, targets.void, targets.iscrowd),
        boxes=None if objects is None else boxes_from_objects(objects, class_names),
        class_targets=None if class_targets is None else class_targets.detach().cpu(),
    )


def class_map_maxima(crms: Tensor, image_size: tuple[int, int]) -> Tensor:
    """(C, 2) float (y, x) in image pixels of each class map's maximum: the centre of the CRM cell that holds it.

    crms: (C, h, w) raw class response maps of an image whose original size is `image_size`. The first maximum in
    row-major order wins a tie (`torch.argmax`). The cell-centre mapping is `ranprm.prm.peaks.to_image_coordinates`,
    the one the peaks use.
    """
    c, h, w = crms.shape
    flat = crms.detach().float().reshape(c, h * w).argmax(1)
    cells = torch.stack([flat // w, flat % w], 1)
    return to_image_coordinates(cells, (h, w), 1, image_size)


def prediction_from_model(p: ImagePrediction) -> Prediction:
    """A `Prediction` from the pipeline's output: instances, every valid peak, class scores and map maxima."""
    size = p.instances.image_size
    return Prediction(
        instances=p.instances,
        peaks_yx=p.peaks[:, 1:].detach().cpu(),
        peak_labels=p.peaks[:, 0].detach().cpu().long(),
        class_scores=p.class_logits.detach().cpu(),
        class_max_yx=class_map_maxima(p.crms, size),
    )


def prediction_from_instances(instances: Instances) -> Prediction:
    """A `Prediction` from instances alone (a results file): the instances' seeding peaks, where they have one,
    stand in for the model's peaks; with none, pointing accuracy has nothing to score for this image."""
    peaks = instances.peaks.detach().cpu()
    finite = torch.isfinite(peaks).all(1) if len(peaks) else torch.zeros(0, dtype=torch.bool)
    has_peaks = bool(finite.any())
    return Prediction(
        instances=instances,
        peaks_yx=peaks[finite] if has_peaks else None,
        peak_labels=instances.labels.detach().cpu().long()[finite] if has_peaks else None,
    )


def eval_inputs(
    batch: dict[str, Any],
    class_names: Sequence[str],
    *,
    predictions: Sequence[ImagePrediction] | None = None,
    class_logits: Tensor | None = None,
    keep: Sequence[int] | None = None,
) -> tuple[list[GroundTruth], list[Prediction]]:
    """The evaluators' inputs for the images `keep` (default: all) of a collated batch.

    predictions:  the pipeline's output for exactly the kept images, in their order; or
    class_logits: (B, C) for every image of the batch (classification only).
    The batch's `targets` (instance masks, None for an image without segmentation), `objects` (its annotation's
    boxes, when the dataset carries them) and `labels` (image-level targets) make the ground truth.
    """
    if (predictions is None) == (class_logits is None):
        raise ValueError("eval_inputs: give exactly one of predictions and class_logits")
    rows = list(range(len(batch["image_id"]))) if keep is None else list(keep)
    if predictions is not None and len(predictions) != len(rows):
        raise ValueError(f"eval_inputs: {len(predictions)} predictions for {len(rows)} images")
    objects = batch.get("objects")
    gts, preds = [], []
    for j, i in enumerate(rows):
        gts.append(
            ground_truth(
                batch["image_id"][i],
                batch["orig_size"][i],
                class_names,
                targets=batch["targets"][i] if batch.get("targets") is not None else None,
                objects=objects[i] if objects is not None else None,
                class_targets=batch["labels"][i],
            )
        )
        if predictions is not None:
            preds.append(prediction_from_model(predictions[j]))
        else:
            preds.append(Prediction(class_scores=class_logits[i].detach().cpu()))  # type: ignore[index]
    return gts, preds
