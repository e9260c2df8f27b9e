"""Reading a COCO-format instance dataset: `<root>/annotations/instances_<split>.json` and `<root>/<split>/<file>`.

COCO 2017 by default (splits `train2017`, `val2017`); any set in that layout works (the splits are names).
Each split's JSON is read once into an index by image id (`load_split`), checked up front: malformed JSON, an
annotation naming a missing image or an unknown category, a polygon with fewer than 3 points, an RLE whose size
differs from its image, a listed image file that is missing. Masks are decoded lazily, one image at a time
(`instance_targets`), with faster-coco-eval's mask API (polygons, uncompressed and compressed RLE).

ranprm's image id of a COCO image is its file's stem (`000000000139` for COCO 2017, as in the VOC layout); the
results files use COCO's own int image ids and category ids (`result_ids`). Nothing here knows about Lightning.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from faster_coco_eval.core import mask as mask_utils

from ranprm.data.source import AnnotationSource
from ranprm.data.voc import VOC_CLASSES, InstanceTargets, ObjectAnnotation, image_size_of
from ranprm.errors import ConfigError, DataError

if TYPE_CHECKING:
    from ranprm.eval.results_io import ResultIds

log = logging.getLogger(__name__)

# COCO's names of the 20 VOC classes that COCO spells differently; the other 14 are spelled alike.
COCO_TO_VOC_NAMES: dict[str, str] = {
    "airplane": "aeroplane",
    "motorcycle": "motorbike",
    "couch": "sofa",
    "tv": "tvmonitor",
    "dining table": "diningtable",
    "potted plant": "pottedplant",
}
VOC_TO_COCO_NAMES: dict[str, str] = {voc: coco for coco, voc in COCO_TO_VOC_NAMES.items()}
CLASS_SETS = ("voc", "all")  # data.classes: one of these, or a list of category names


def annotation_path(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}.json"


def check_root(root: str | Path) -> Path:
    """Return `root` as a Path, or raise a DataError that names what is missing."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data.root={str(path)!r} is not a folder; point it at a COCO-format folder (annotations/"
            "instances_<split>.json and <split>/ image folders, as COCO 2017)"
        )
    if not (path / "annotations").is_dir():
        found = sorted(p.name for p in path.iterdir() if p.is_dir())[:6]
        raise DataError(
            f"data.root={str(path)!r} lacks annotations/; a COCO-format folder holds annotations/"
            f"instances_<split>.json and <split>/ (found folders: {found or 'none'})"
        )
    return path


@dataclass(frozen=True)
class ClassSelection:
    """The kept categories: ranprm's class names (in ranprm's class order) and their COCO category ids and names."""

    names: tuple[str, ...]
    category_ids: tuple[int, ...]
    category_names: tuple[str, ...]

    def index_of(self) -> dict[int, int]:
        """COCO category id -> ranprm class index."""
        return {cid: i for i, cid in enumerate(self.category_ids)}


def select_classes(classes: Any, categories: Mapping[int, str], source: Path) -> ClassSelection:
    """The classes `data.classes` keeps from a JSON's `categories` ({id: name}).

    `voc`: the 20 VOC classes in VOC's order, matched to COCO's names (airplane -> aeroplane, ...); `all`: every
    category in id order, with COCO's names; a list: those categories in the list's order, by COCO name (a VOC
    name of a renamed class is accepted too and kept as the class's name).
    """
    by_name: dict[str, int] = {}
    for cid, name in categories.items():
        if name in by_name:
            raise DataError(f"annotation file {source}: categories {by_name[name]} and {cid} share the name {name!r}")
        by_name[name] = cid
    if classes == "all":
        ids = sorted(categories)
        return ClassSelection(tuple(categories[i] for i in ids), tuple(ids), tuple(categories[i] for i in ids))
    wanted = list(VOC_CLASSES) if classes == "voc" else list(classes)
    ids = []
    for name in wanted:
        coco_name = name if name in by_name else VOC_TO_COCO_NAMES.get(name, name)
        if coco_name not in by_name:
            raise ConfigError(
                f"data.classes={classes if isinstance(classes, str) else list(classes)}: {source} has no category "
                f"{coco_name!r}; its categories: {', '.join(sorted(by_name))[:300]}"
            )
        ids.append(by_name[coco_name])
    return ClassSelection(tuple(wanted), tuple(ids), tuple(categories[i] for i in ids))


def check_classes_option(classes: Any) -> None:
    """`data.classes`: `voc`, `all` or a non-empty list of distinct, non-empty names (a ConfigError otherwise)."""
    if isinstance(classes, str):
        if classes not in CLASS_SETS:
            raise ConfigError(f"data.classes={classes!r} is not valid; give voc, all or a list of COCO category names")
        return
    if not isinstance(classes, list | tuple) or not classes or not all(isinstance(c, str) and c.strip()
                                                                       for c in classes):  # fmt: skip
        raise ConfigError(f"data.classes={classes!r} must be voc, all or a non-empty list of category names")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"data.classes={list(classes)} lists a class twice")


# ---------------------------------------------------------------------------------------------------- the index
# slots: COCO 2017 train holds 118k images and 860k annotations; a record without a __dict__ is about half the size.
@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image of a split: its file, its size as the JSON gives it, and its annotations of kept classes."""

    coco_id: int
    file_name: str
    height: int
    width: int
    annotations: tuple[AnnotationRecord, ...]


@dataclass(frozen=True, slots=True)
class AnnotationRecord:
    """One annotation of a kept class. `segmentation` is None where it was not kept (training splits)."""

    ann_id: int
    label: int  # ranprm class index
    iscrowd: bool
    bbox: tuple[float, float, float, float] | None  # x, y, w, h as COCO writes them
    segmentation: Any = None


@dataclass
class COCOSplit:
    """One split's index: image records by ranprm image id (the file stem), in the JSON's image order."""

    path: Path
    image_dir: Path
    classes: ClassSelection
    images: dict[str, ImageRecord] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # one line per image skipped (data.skip_bad_images)

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / self.images[image_id].file_name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_numbers(values: list[Any]) -> bool:
    """All of `values` are finite numbers. One C-level `math.fsum` per polygon instead of a check per number: COCO
    2017 train holds about 30 million polygon coordinates. It raises TypeError on a non-number and gives a non-finite
    sum (or OverflowError) when a value is not finite."""
    try:
        return math.isfinite(math.fsum(values))
    except (TypeError, OverflowError):
        return False


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object of an annotation file, or one DataError naming the file."""
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist; check data.root and the split name")
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(
            f"annotation file {path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from err
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DataError(f"annotation file {path} cannot be read ({str(err)[:120]})") from err
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                       "categories")):  # fmt: skip
        raise DataError(
            f"annotation file {path} must be a COCO instances object with lists 'images', 'annotations' and "
            "'categories'"
        )
    return data


def read_categories(data: Mapping[str, Any], path: Path) -> dict[int, str]:
    """{category id: name} of a parsed annotation file."""
    categories: dict[int, str] = {}
    for cat in data["categories"]:
        if not (isinstance(cat, dict) and _is_int(cat.get("id")) and isinstance(cat.get("name"), str)):
            raise DataError(f"annotation file {path}: category {cat!r:.80} needs an int 'id' and a 'name'")
        if cat["id"] in categories:
            raise DataError(f"annotation file {path}: category id {cat['id']} is listed twice")
        categories[cat["id"]] = cat["name"]
    if not categories:
        raise DataError(f"annotation file {path} lists no categories")
    return categories


def segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    """Why a COCO `segmentation` cannot be decoded at (height, width), or None: polygons are lists of at least 3
    finite (x, y) points; an RLE has `size` [height, width] and `counts` a string or a list of non-negative ints."""
    if isinstance(seg, list):
        if not seg:
            return "has an empty polygon list"
        for poly in seg:
            if not isinstance(poly, list) or len(poly) % 2 or not _finite_numbers(poly):
                return "has a polygon that is not a flat list of finite x, y numbers"
            if len(poly) < 6:
                return f"has a polygon with {len(poly) // 2} point(s); a polygon needs at least 3"
        return None
    if isinstance(seg, dict):
        if seg.get("size") != [height, width]:
            return f"has an RLE of size {seg.get('size')!r} but its image is [{height}, {width}] (height, width)"
        counts = seg.get("counts")
        if isinstance(counts, str):
            return None
        runs = np.asarray(counts) if isinstance(counts, list) and counts else None
        if runs is not None and runs.ndim == 1 and runs.dtype.kind in "iu" and bool((runs >= 0).all()):
            total = int(runs.sum())
            return None if total == height * width else f"has RLE counts summing to {total}, not height * width"
        return "has RLE counts that are neither a string nor a list of non-negative integers"
    return "has a segmentation that is neither polygons nor an RLE"


def load_split(
    root: Path,
    split: str,
    classes: Any,
    *,
    keep_segmentation: bool,
    skip_bad_images: bool = False,
    check_files: bool = True,
) -> COCOSplit:
    """Index one split: every check that needs no pixel decoded, done now (see the module docstring).

    keep_segmentation: keep the polygons/RLEs (evaluated splits; a training split needs labels only, which saves
        most of the memory of COCO's 450 MB train JSON).
    skip_bad_images: an image with a bad annotation or a missing file is left out and counted (logged as a warning)
        instead of stopping with a DataError; an annotation naming an image that is not listed is left out.
    """
    path = annotation_path(root, split)
    data = read_json(path)
    selection = select_classes(classes, read_categories(data, path), path)
    label_of = selection.index_of()
    known_categories = set(read_categories(data, path))
    out = COCOSplit(path=path, image_dir=root / split, classes=selection)

    def bad(message: str) -> None:
        if not skip_bad_images:
            raise DataError(f"annotation file {path}: {message}; fix it, or set data.skip_bad_images=true to skip it")
        out.skipped.append(message)

    listed: dict[int, tuple[str, int, int]] = {}
    stem_of: dict[str, int] = {}
    for image in data["images"]:
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            raise DataError(f"annotation file {path}: image entry {image!r:.80} has no int 'id'")
        image_id, name = image["id"], image.get("file_name")
        height, width = image.get("height"), image.get("width")
        if not isinstance(name, str) or not name or name.startswith("/") or ".." in PurePosixPath(name).parts:
            raise DataError(f"annotation file {path}: image {image_id} has file_name {name!r}; give a relative path")
        if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
            raise DataError(f"annotation file {path}: image {image_id} needs positive int 'height' and 'width'")
        if image_id in listed:
            raise DataError(f"annotation file {path}: image id {image_id} is listed twice")
        stem = PurePosixPath(name).stem
        if stem in stem_of:
            raise DataError(
                f"annotation file {path}: images {stem_of[stem]} and {image_id} share the file stem {stem!r}, "
                "ranprm's image id; rename one"
            )
        listed[image_id], stem_of[stem] = (name, height, width), image_id

    annotations: dict[int, list[AnnotationRecord]] = {i: [] for i in listed}
    bad_images: set[int] = set()
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise DataError(f"annotation file {path}: annotation {ann!r:.80} has no int 'id'")
        ann_id, image_id, category_id = ann["id"], ann.get("image_id"), ann.get("category_id")
        if not _is_int(image_id) or image_id not in listed:
            bad(f"annotation {ann_id} names image id {image_id!r:.40}, which 'images' does not list")
            continue
        if image_id in bad_images:
            continue
        problem = None
        if not _is_int(category_id) or category_id not in known_categories:
            problem = f"names category id {category_id!r:.40}, which 'categories' does not list"
        elif ann.get("iscrowd", 0) not in (0, 1):
            problem = f"has iscrowd {ann.get('iscrowd')!r}; it must be 0 or 1"
        elif category_id in label_of:
            _, height, width = listed[image_id]
            problem = segmentation_problem(ann.get("segmentation"), height, width)
        bbox = ann.get("bbox")
        if (
            problem is None
            and bbox is not None
            and not (isinstance(bbox, list) and len(bbox) == 4 and _finite_numbers(bbox))
        ):
            problem = f"has bbox {bbox!r:.60}; it must be [x, y, w, h]"
        if problem is not None:
            bad(f"annotation {ann_id} (image {image_id}) {problem}")
            bad_images.add(image_id)
            continue
        if category_id not in label_of:
            continue  # a class data.classes does not keep: background, as objects of other classes are in VOC
        annotations[image_id].append(
            AnnotationRecord(
                ann_id=ann_id,
                label=label_of[category_id],
                iscrowd=bool(ann.get("iscrowd", 0)),
                bbox=tuple(float(v) for v in bbox) if bbox is not None else None,  # type: ignore[arg-type]
                segmentation=ann["segmentation"] if keep_segmentation else None,
            )
        )
    del data  # the parsed JSON is the bulk of the memory; only the records are kept

    for image_id, (name, height, width) in listed.items():
        if image_id in bad_images:
            continue
        if check_files and not (out.image_dir / name).is_file():
            if not skip_bad_images:
                raise DataError(
                    f"annotation file {path}: image {image_id} has no file {out.image_dir / name}; add it, or set "
                    "data.skip_bad_images=true to skip such images"
                )
            out.skipped.append(f"image {image_id} has no file {out.image_dir / name}")
            continue
        out.images[PurePosixPath(name).stem] = ImageRecord(image_id, name, height, width, tuple(annotations[image_id]))
    if out.skipped:
        log.warning("data: skipped %d image(s) or annotation(s) of %s (data.skip_bad_images=true); first: %s",
                    len(out.skipped), path, out.skipped[0])  # fmt: skip
    if not out.images:
        raise DataError(f"annotation file {path} lists no usable image")
    return out


# --------------------------------------------------------------------------------------------- per image
def objects_of(record: ImageRecord, class_names: Sequence[str]) -> list[ObjectAnnotation]:
    """The non-crowd instances of an image as VOC objects: their class (image-level labels) and box (the pointing
    game), the box as VOC writes it (1-based, inclusive) around the pixels COCO's [x, y, w, h] covers."""
    objects = []
    for ann in record.annotations:
        if ann.iscrowd:
            continue
        if ann.bbox is None:
            box = (0, 0, 0, 0)  # no box: NaN in the pointing game, as for a VOC object without <bndbox>
        else:
            x, y, w, h = ann.bbox
            box = (math.floor(x) + 1, math.floor(y) + 1, math.ceil(x + w), math.ceil(y + h))
        objects.append(ObjectAnnotation(class_names[ann.label], False, box))
    return objects


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """Bool (height, width) mask of a checked COCO segmentation (see `segmentation_problem`): polygons merged,
    uncompressed RLE compressed first, all through faster-coco-eval's mask API."""
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = {"size": [height, width], "counts": seg["counts"]}
    return np.asarray(mask_utils.decode(rle), dtype=bool)


def instance_targets(split: COCOSplit, image_id: str, image_size: tuple[int, int]) -> InstanceTargets:
    """The instances of kept classes of one image at its original size, crowd regions flagged `iscrowd`.

    An image without any has zero instances (not None): it is still scored, so predictions on it are false
    positives, as COCOeval counts them. COCO has no void; the crowd regions are void for the `voc` protocol
    (`ranprm.eval.inputs.GroundTruth`).
    """
    record = split.images[image_id]
    h, w = record.height, record.width
    if (h, w) != tuple(image_size):
        raise DataError(
            f"image {split.image_path(image_id)} is {image_size[1]}x{image_size[0]} but {split.path} gives image "
            f"{record.coco_id} as {w}x{h}; its masks would not fit"
        )
    masks, labels, crowd = [], [], []
    for ann in record.annotations:
        if ann.segmentation is None:
            raise ValueError(f"{split.path} was indexed without segmentations; load it with keep_segmentation=True")
        try:
            masks.append(decode_segmentation(ann.segmentation, h, w))
        except (ValueError, RuntimeError) as err:
            raise DataError(f"annotation file {split.path}: annotation {ann.ann_id} (image {record.coco_id}) "
                            f"cannot be decoded ({err})") from err  # fmt: skip
        labels.append(ann.label)
        crowd.append(ann.iscrowd)
    return InstanceTargets(
        masks=torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.bool),
        labels=torch.tensor(labels, dtype=torch.long),
        void=torch.zeros(h, w, dtype=torch.bool),
        iscrowd=torch.tensor(crowd, dtype=torch.bool),
    )


def check_image_sizes(split: COCOSplit, ids: Sequence[str]) -> None:
    """The evaluated images' sizes from their headers against the JSON's height and width (masks are decoded at
    the JSON's size), before anything trains."""
    for image_id in ids:
        record = split.images[image_id]
        size = image_size_of(split.image_path(image_id))
        if size != (record.height, record.width):
            raise DataError(
                f"image {split.image_path(image_id)} is {size[1]}x{size[0]} but {split.path} gives image "
                f"{record.coco_id} as {record.width}x{record.height}; fix the JSON's height and width"
            )


# ------------------------------------------------------------------------------------------------ the source
class COCOSource(AnnotationSource):
    """A COCO-format folder: each split's JSON indexed once, when first asked for (`load_split`).

    mask_splits: the splits whose segmentations are kept (the evaluated ones); the others keep labels and boxes.
    """

    def __init__(self, root: Path, classes: Any, mask_splits: Sequence[str], skip_bad_images: bool = False,
                 label_split: str | None = None) -> None:  # fmt: skip
        check_classes_option(classes)
        self.root, self.classes = root, classes
        self.mask_splits = set(mask_splits)
        self.skip_bad_images = skip_bad_images
        self.label_split = label_split or next(iter(sorted(self.mask_splits)), None)
        self._splits: dict[str, COCOSplit] = {}
        self._split_of: dict[str, COCOSplit] = {}  # ranprm image id -> the split that lists it
        self._selection: ClassSelection | None = None

    def load(self, split: str) -> COCOSplit:
        if split not in self._splits:
            loaded = load_split(self.root, split, self.classes, keep_segmentation=split in self.mask_splits,
                                skip_bad_images=self.skip_bad_images)  # fmt: skip
            if self._selection is not None and loaded.classes.category_ids != self._selection.category_ids:
                raise DataError(
                    f"annotation file {loaded.path} gives the classes {list(loaded.classes.names)} the category ids "
                    f"{list(loaded.classes.category_ids)}, but an earlier split gave "
                    f"{list(self._selection.category_ids)}; every split must share one category list"
                )
            self._selection = loaded.classes
            self._splits[split] = loaded
            for image_id in loaded.images:
                self._split_of[image_id] = loaded
        return self._splits[split]

    @property
    def selection(self) -> ClassSelection:
        if self._selection is None:
            if self.label_split is None:
                raise ValueError("COCOSource: name a split to read the categories from")
            self.load(self.label_split)
        assert self._selection is not None
        return self._selection

    @property
    def class_names(self) -> tuple[str, ...]:  # type: ignore[override]
        if isinstance(self.classes, list | tuple):
            return tuple(self.classes)
        if self.classes == "voc":
            return VOC_CLASSES
        return self.selection.names  # `all`: the categories of the JSON

    def split_ids(self, split: str, task: str, training: bool) -> list[str]:
        loaded = self.load(split)
        ids = list(loaded.images)
        if not training:
            return ids  # every image is scored: predictions on one without instances are false positives
        kept = [i for i in ids if any(not a.iscrowd for a in loaded.images[i].annotations)]
        if len(kept) < len(ids):
            log.info("data: %d of the %d images of %s have no (non-crowd) instance of the %d kept classes and are "
                     "left out of training", len(ids) - len(kept), len(ids), loaded.path.name,
                     len(self.class_names))  # fmt: skip
        if not kept:
            raise DataError(f"annotation file {loaded.path} has no image with an instance of data.classes")
        return kept

    def split_name(self, split: str, task: str) -> str:
        return f"instances_{split}"

    def _record(self, image_id: str) -> tuple[COCOSplit, ImageRecord]:
        split = self._split_of[image_id]
        return split, split.images[image_id]

    def image_path(self, image_id: str) -> Path:
        return self._split_of[image_id].image_path(image_id)

    def objects(self, image_id: str) -> list[ObjectAnnotation]:
        return objects_of(self._record(image_id)[1], self.class_names)

    def instance_targets(self, image_id: str, image_size: tuple[int, int]) -> InstanceTargets:
        return instance_targets(self._split_of[image_id], image_id, image_size)

    def check_masks(self, ids: Sequence[str], split_name: str, required: bool) -> int:
        for image_id in ids:
            check_image_sizes(self._split_of[image_id], [image_id])
        return len(ids)

    def result_ids(self) -> ResultIds:
        from ranprm.eval.results_io import ResultIds

        selection = self.selection
        return ResultIds(
            image_ids={i: split.images[i].coco_id for i, split in self._split_of.items()},
            category_ids=selection.category_ids,
            category_names=selection.category_names,
        )


def result_ids_for_images(path: Path, class_names: Sequence[str], images: Sequence[Path]) -> ResultIds:
    """COCO's ids for `ranprm-predict coco_annotations=<instances JSON>`: each input image's id by its file name
    (keyed by stem, as the results are), each class's category id by name (a VOC name of a renamed class finds its
    COCO category). An input image the JSON does not list is a DataError, before anything is written."""
    from ranprm.eval.results_io import ResultIds

    data = read_json(path)
    try:
        selection = select_classes(list(class_names), read_categories(data, path), path)
    except ConfigError as err:
        raise DataError(f"coco_annotations={str(path)!r}: the checkpoint's classes do not match ({err})") from err
    id_of_name: dict[str, int] = {}
    for image in data["images"]:
        if isinstance(image, dict) and _is_int(image.get("id")) and isinstance(image.get("file_name"), str):
            id_of_name[PurePosixPath(image["file_name"]).name] = image["id"]
    missing = [p.name for p in images if p.name not in id_of_name]
    if missing:
        raise DataError(
            f"coco_annotations={str(path)!r} does not list {len(missing)} input image(s) (first: {missing[0]!r}); "
            "give the annotation file of the images' split"
        )
    return ResultIds(
        image_ids={p.stem: id_of_name[p.name] for p in images},
        category_ids=selection.category_ids,
        category_names=selection.category_names,
    )
