"""Reading a folder in PASCAL VOC 2012 layout: split ids, image-level labels, images and instance masks.

The same code reads the real `VOCdevkit/VOC2012` and the embedded synthetic dataset (which is written in that
layout). Nothing here knows about Lightning.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import defusedxml.ElementTree as SafeET
import numpy as np
import torch
from defusedxml import DefusedXmlException
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from ranprm.errors import DataError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

_EXIF_ORIENTATION = 0x0112  # the EXIF tag PIL's ImageOps.exif_transpose reads
VOID = 255  # VOC marks object borders and difficult regions with 255 in the segmentation PNGs.
REQUIRED_DIRS = ("JPEGImages", "Annotations", "ImageSets")


def image_path(root: Path, image_id: str) -> Path:
    """Where VOC keeps the image of `image_id`: `<root>/JPEGImages/<id>.jpg`."""
    return root / "JPEGImages" / f"{image_id}.jpg"


def check_root(root: str | Path) -> Path:
    """Return `root` as a Path, or raise a DataError that names what is missing."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data.root={str(path)!r} is not a folder; point it at VOCdevkit/VOC2012 (the folder that holds "
            "JPEGImages/, Annotations/ and ImageSets/)"
        )
    missing = [d for d in REQUIRED_DIRS if not (path / d).is_dir()]
    if missing:
        found = sorted(p.name for p in path.iterdir() if p.is_dir())[:6]
        raise DataError(
            f"data.root={str(path)!r} lacks {', '.join(d + '/' for d in missing)}; it should be VOCdevkit/VOC2012 "
            f"(found folders: {found or 'none'})"
        )
    return path


def read_split(root: Path, task: str, split: str) -> list[str]:
    """Image ids listed in `ImageSets/<task>/<split>.txt` (one id per line; VOC per-class files add a label)."""
    split_file = root / "ImageSets" / task / f"{split}.txt"
    if not split_file.is_file():
        raise DataError(f"split file {split_file} does not exist; check data.root and the split name {split!r}")
    try:
        lines = split_file.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM is not part of the first id
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(
            f"split file {split_file} cannot be read as text ({err}); it should list one id per line"
        ) from err
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise DataError(f"split file {split_file} lists no image ids; fill it or choose another split")
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        image_id = line.split()[0]
        if image_id in first_line:  # it would be trained on and scored several times
            raise DataError(
                f"split file {split_file} lists the id {image_id!r} twice (lines {first_line[image_id]} and "
                f"{number}); remove the duplicate"
            )
        if "/" in image_id or "\\" in image_id or image_id.startswith("."):
            raise DataError(
                f"split file {split_file} line {number}: {image_id!r} is not an image id (ids are file names "
                "without folder or extension)"
            )
        first_line[image_id] = number
    missing = [i for i in ids if not image_path(root, i).is_file()]
    if missing:
        raise DataError(
            f"split file {split_file} lists {len(missing)} ids with no JPEGImages/<id>.jpg (first: {missing[0]!r}); "
            "remove them from the split or add the images"
        )
    return ids


class ObjectAnnotation(NamedTuple):
    """One `<object>` of an annotation. A NamedTuple (immutable) rather than a frozen dataclass: it travels in
    validation batches, and Lightning's device transfer rebuilds dataclasses field by field, which a frozen one
    refuses."""

    name: str
    difficult: bool
    box: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax (1-based, inclusive, as VOC writes them)


def read_annotation(xml_path: Path, class_names: tuple[str, ...]) -> list[ObjectAnnotation]:
    """The objects of one `Annotations/<id>.xml`, parsed with a hardened parser (no entity expansion)."""
    if not xml_path.is_file():
        raise DataError(f"annotation {xml_path} does not exist; every listed image needs Annotations/<id>.xml")
    try:
        tree = SafeET.parse(xml_path)
    except (SafeET.ParseError, DefusedXmlException, ValueError) as err:
        raise DataError(f"annotation {xml_path} is not valid VOC XML ({err}); fix or remove it") from err
    objects = []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in class_names:
            raise DataError(
                f"annotation {xml_path} has an object of unknown class {name!r}; known classes: "
                f"{', '.join(class_names)} (set data.class_names to match the dataset)"
            )
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        bb = obj.find("bndbox")
        try:
            box = (
                tuple(int(float(bb.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
                if bb is not None
                else (0, 0, 0, 0)
            )
        except (TypeError, ValueError) as err:
            raise DataError(f"annotation {xml_path} has a malformed <bndbox> for {name!r}") from err
        objects.append(ObjectAnnotation(name, difficult, box))  # type: ignore[arg-type]
    if not objects:
        raise DataError(f"annotation {xml_path} has no <object>; an image-level label needs at least one object")
    return objects


def image_labels(
    objects: list[ObjectAnnotation], class_names: tuple[str, ...], difficult_as_positive: bool = True
) -> Tensor:
    """Multi-hot (C,) float label vector. PRM counts "difficult" objects as positive; that is an option."""
    labels = torch.zeros(len(class_names))
    for obj in objects:
        if difficult_as_positive or not obj.difficult:
            labels[class_names.index(obj.name)] = 1.0
    return labels


@contextlib.contextmanager
def _pil_open(path: Path, kind: str, broken: str) -> Iterator[Image.Image]:
    """`Image.open(path)` with PIL's decompression-bomb limit enforced (its warning raised, not shown), and every
    way the file can fail, in the open or in the caller's reading inside the block, one `DataError` naming it:
    "<kind> <path> does not exist", "... is larger than ...", "<kind> <path> <broken> (<reason>)"."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                yield img
    except FileNotFoundError as err:
        raise DataError(f"{kind} {path} does not exist") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{kind} {path} is larger than PIL's decompression-bomb limit; refusing to decode it") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise DataError(f"{kind} {path} {broken} ({err})") from err


def read_image(path: Path) -> Tensor:
    """RGB uint8 image (3, H, W), whatever the file's PIL mode (see `_to_rgb` for how each mode is converted).

    PIL reads the header first, so its decompression-bomb limit stays in force: an image over it is refused,
    not decoded. RGB and grayscale JPEGs (all of VOC) are then decoded by `torchvision.io` (libjpeg-turbo into a
    tensor, no PIL image or NumPy copy: 1.6-2x faster, identical pixels); anything else, and any JPEG that
    torchvision decodes with a warning or an error (truncated, corrupt), goes through PIL, which refuses it.
    A photo's EXIF orientation is applied (both decoders), so the image, its overlays and its size are the
    picture as viewers show it; `image_size_of` agrees.
    """
    with _pil_open(path, "image", "is truncated or corrupt") as img:
        if img.format == "JPEG" and img.mode in ("RGB", "L"):
            fast = _decode_with_torchvision(path)
            if fast is not None:
                return fast
        img.load()
        img = ImageOps.exif_transpose(img)
        mode = img.mode
        try:
            rgb = _to_rgb(img)
        except (ValueError, OSError) as err:
            raise DataError(
                f"image {path} has PIL mode {mode}, which ranprm cannot convert to RGB ({err}); save it as RGB"
            ) from err
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Transparent pixels are composited onto ImageNet's mean colour: after normalisation they are 0, the input a network
# trained on photos treats as "nothing here", and the overlays show them in a neutral grey. (Dropping alpha instead
# would show whatever colour the file stores under transparent pixels, often black or leftover paint.)
ALPHA_BACKGROUND: tuple[int, int, int] = (124, 116, 104)  # round(255 * (0.485, 0.456, 0.406))


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def _to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB.

    - 16-bit grey (`I;16*`, and PIL's 32-bit `I`, which 16-bit PNGs can open as) is scaled from 0..65535 to 0..255;
      PIL's own conversion clips it instead, so any value above 255 would become white. Values outside 0..65535
      (only a 32-bit TIFF can hold them) are clipped.
    - 32-bit float grey (`F`, TIFF only) is read as 0..255, as PIL's own conversion does, rounded and clipped.
    - Any mode with transparency (RGBA, LA, PA, premultiplied RGBa/La, a palette or grey image with a transparent
      colour) is composited onto `ALPHA_BACKGROUND`: out = alpha * colour + (1 - alpha) * background.
    - Everything else (1, L, P, CMYK, YCbCr, RGBX, HSV, ...) by PIL's `convert("RGB")`; CMYK without an ICC
      profile uses PIL's plain rule R = 255 - C - K, clipped.
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "F":
        grey = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if _has_alpha(img):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255.0
        out = rgba[..., :3] * alpha + np.asarray(ALPHA_BACKGROUND, dtype=np.float64) * (1.0 - alpha)
        return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB")
    return img.convert("RGB")


def _decode_with_torchvision(path: Path) -> Tensor | None:
    """(3, H, W) uint8 RGB, or None when torchvision fails or warns (libjpeg warns on truncated data)."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError:
            return None
    return None if caught else image


def _read_index_png(path: Path, header_only: bool = False) -> np.ndarray | tuple[int, int]:
    """The class/instance indices of a VOC mask PNG (H, W) uint8; `header_only`: its (H, W) from the header alone."""
    with _pil_open(path, "mask", "is unreadable") as img:
        if img.mode not in ("P", "L"):
            raise DataError(f"mask {path} has mode {img.mode}; VOC masks are palette (P) or grey (L) PNGs")
        if header_only:
            return int(img.size[1]), int(img.size[0])
        return np.asarray(img).copy()


def image_size_of(path: Path) -> tuple[int, int]:
    """(H, W) of an image as `read_image` returns it, from its header only (PIL reads headers lazily): an EXIF
    orientation that turns the picture by 90 degrees (5 to 8) swaps the stored sides."""
    with _pil_open(path, "image", "is unreadable") as img:
        w, h = img.size
        turned = img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    return (int(w), int(h)) if turned else (int(h), int(w))


def mask_paths(root: Path, image_id: str) -> tuple[Path, Path]:
    """(SegmentationObject PNG, SegmentationClass PNG) of `image_id`."""
    return root / "SegmentationObject" / f"{image_id}.png", root / "SegmentationClass" / f"{image_id}.png"


def check_masks(root: Path, ids: list[str], required: bool, split_name: str, num_classes: int | None = None) -> int:
    """Check the mask PNGs of `ids` from their headers (present, palette or grey, the size of their image) before
    anything trains, so a bad mask stops the run now with one line instead of at the first evaluation.

    `required`: every id must have masks (VOC's Segmentation splits); else ids without a SegmentationObject PNG are
    images without instances, as in VOC's Main splits. `num_classes`: also read each class PNG and refuse a value
    other than 0 (background), 1..num_classes and 255 (void), naming the file and the value (such a value gave a
    traceback at the first validation, after a whole training epoch). Returns the number of ids with masks.
    """
    with_masks = 0
    for image_id in ids:
        obj_path, cls_path = mask_paths(root, image_id)
        if not obj_path.is_file():
            if required:
                raise DataError(
                    f"mask {obj_path} does not exist; every image of the evaluated split {split_name} needs "
                    "SegmentationObject/<id>.png and SegmentationClass/<id>.png"
                )
            continue
        if not cls_path.is_file():
            raise DataError(f"mask {obj_path} has no matching {cls_path}; VOC instances take their class from it")
        size = image_size_of(image_path(root, image_id))
        for path in (obj_path, cls_path):
            h, w = _read_index_png(path, header_only=True)  # type: ignore[misc]
            if (h, w) != size:
                raise DataError(
                    f"mask {path} is {w}x{h} but its image is {size[1]}x{size[0]}; masks must match their image's size"
                )
        if num_classes is not None:
            check_class_values(cls_path, num_classes)
        with_masks += 1
    return with_masks


def check_class_values(cls_path: Path, num_classes: int) -> None:
    """A SegmentationClass PNG holds 0 (background), 1..num_classes (class i + 1) and 255 (void) only."""
    values = np.unique(_read_index_png(cls_path))
    bad = [int(v) for v in values if not (0 <= v <= num_classes or v == VOID)]
    if bad:
        raise DataError(
            f"mask {cls_path} holds class value {bad[0]}"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            + f"; with {num_classes} classes in data.class_names its values must be 0 (background), 1..{num_classes} "
            "or 255 (void): fix the mask or the class list"
        )


@dataclass
class InstanceTargets:
    """Ground-truth instances of one image at its original size."""

    masks: Tensor  # (M, H, W) bool
    labels: Tensor  # (M,) long, 0-based class index
    void: Tensor  # (H, W) bool, VOC's 255 pixels: ignored in every IoU
    iscrowd: Tensor | None = None  # (M,) bool, COCO's crowd regions (None: none, as in VOC); see GroundTruth


def read_instance_masks(root: Path, image_id: str, image_size: tuple[int, int]) -> InstanceTargets | None:
    """Instances from `SegmentationObject/<id>.png` with classes from `SegmentationClass/<id>.png`.

    Returns None when the image has no segmentation (most of VOC's classification images).
    """
    obj_path, cls_path = mask_paths(root, image_id)
    if not obj_path.is_file():
        return None
    if not cls_path.is_file():
        raise DataError(f"mask {obj_path} has no matching {cls_path}; VOC instances take their class from it")
    obj, cls = _read_index_png(obj_path), _read_index_png(cls_path)
    assert isinstance(obj, np.ndarray) and isinstance(cls, np.ndarray)
    for path, arr in ((obj_path, obj), (cls_path, cls)):
        if arr.shape != tuple(image_size):
            raise DataError(
                f"mask {path} is {arr.shape[1]}x{arr.shape[0]} but its image is {image_size[1]}x{image_size[0]}; "
                "masks must match their image's size"
            )
    ids = [int(i) for i in np.unique(obj) if i not in (0, VOID)]
    masks, labels = [], []
    for inst in ids:
        region = obj == inst
        classes, counts = np.unique(cls[region], return_counts=True)
        keep = (classes != 0) & (classes != VOID)
        if not keep.any():
            continue  # an instance with no class pixels cannot be scored; VOC never has one
        masks.append(region)
        labels.append(int(classes[keep][counts[keep].argmax()]) - 1)
    h, w = image_size
    return InstanceTargets(
        masks=torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.bool),
        labels=torch.tensor(labels, dtype=torch.long),
        void=torch.from_numpy(obj == VOID),
    )
