"""A tiny COCO-format folder written by the tests (no download): every annotation form, with masks known by
construction.

Rectangles only: a polygon with integer corners (x0, y0), (x1, y0), (x1, y1), (x0, y1) covers the pixels
[y0:y1, x0:x1] (COCO's rasteriser samples pixel centres... and the tests check exactly that), and an RLE is written
from the rectangle's own pixels, so each decoded mask must equal `rect(...)` pixel for pixel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from faster_coco_eval.core import mask as mask_utils
from PIL import Image

H, W = 48, 64  # not square: a transposed mask would not fit
# COCO 2017's ids and names of the 20 VOC classes, and the kite (not a VOC class); listed out of id order.
COCO_IDS = {"person": 1, "bicycle": 2, "car": 3, "motorcycle": 4, "airplane": 5, "bus": 6, "train": 7, "boat": 9,
            "bird": 16, "cat": 17, "dog": 18, "horse": 19, "sheep": 20, "cow": 21, "bottle": 44, "chair": 62,
            "couch": 63, "potted plant": 64, "dining table": 67, "tv": 72, "kite": 38}  # fmt: skip
CATEGORIES = [{"id": i, "name": name, "supercategory": "thing"} for name, i in COCO_IDS.items()]
COLOURS = {1: (220, 60, 60), 5: (60, 200, 60), 18: (60, 60, 220), 38: (200, 200, 40)}


def rect(y0: int, y1: int, x0: int, x1: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def polygon(y0: int, y1: int, x0: int, x1: int) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE written out by hand: run lengths of the column-major pixels, starting with zeros."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


# (image id, [(annotation id, category id, iscrowd, form, rectangles (y0, y1, x0, x1))])
VAL_IMAGES: list[tuple[int, list[tuple[int, int, int, str, list[tuple[int, int, int, int]]]]]] = [
    (101, [
        (11, 1, 0, "polygon", [(6, 30, 4, 20)]),          # person
        (12, 5, 0, "rle", [(30, 40, 30, 60)]),            # airplane, compressed RLE
        (13, 18, 0, "counts", [(2, 10, 40, 50)]),         # dog, uncompressed RLE
        (14, 1, 1, "counts", [(36, 46, 2, 20)]),          # a crowd of people, uncompressed RLE as COCO writes crowds
        (15, 38, 0, "polygon", [(12, 20, 30, 38)]),       # kite: not a VOC class
    ]),
    (102, [(21, 38, 0, "polygon", [(10, 30, 10, 30)])]),  # only a kite: no VOC instance
    (103, [(31, 18, 0, "polygon", [(5, 15, 5, 15), (20, 30, 40, 55)])]),  # one dog in two polygons
]  # fmt: skip
TRAIN_IMAGES: list[tuple[int, list[tuple[int, int, int, str, list[tuple[int, int, int, int]]]]]] = [
    (1, [(101, 1, 0, "polygon", [(4, 30, 6, 22)])]),
    (2, [(102, 18, 0, "polygon", [(20, 44, 30, 60)])]),
    (3, [(103, 5, 0, "rle", [(5, 20, 20, 60)]), (104, 1, 0, "polygon", [(25, 45, 4, 20)])]),
    (4, [(105, 1, 0, "polygon", [(10, 40, 30, 46)]), (106, 18, 0, "counts", [(2, 14, 2, 20)])]),
    (5, [(107, 1, 1, "counts", [(0, 20, 0, 30)]), (108, 5, 0, "rle", [(30, 45, 10, 50)])]),
    (6, [(109, 38, 0, "polygon", [(10, 30, 10, 30)])]),  # only a kite: left out of training under classes=voc
    (7, [(110, 1, 1, "counts", [(10, 40, 10, 40)])]),  # only a crowd: no image-level label, left out of training
]  # fmt: skip


def expected_mask(rects: list[tuple[int, int, int, int]]) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    for r in rects:
        mask |= rect(*r)
    return mask


def _segmentation(form: str, rects: list[tuple[int, int, int, int]]) -> Any:
    if form == "polygon":
        return [polygon(*r) for r in rects]
    mask = expected_mask(rects)
    return compressed_rle(mask) if form == "rle" else uncompressed_rle(mask)


def coco_json(images: list[tuple[int, list[Any]]]) -> dict[str, Any]:
    """The instances JSON of `images` (VAL_IMAGES / TRAIN_IMAGES form)."""
    out: dict[str, Any] = {"images": [], "annotations": [], "categories": CATEGORIES}
    for image_id, anns in images:
        out["images"].append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": H, "width": W})
        for ann_id, category_id, iscrowd, form, rects in anns:
            mask = expected_mask(rects)
            out["annotations"].append({
                "id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": iscrowd,
                "segmentation": _segmentation(form, rects), "area": float(mask.sum()), "bbox": _bbox(mask),
            })  # fmt: skip
    return out


def write_split(root: Path, split: str, images: list[tuple[int, list[Any]]], seed: int = 0) -> dict[str, Any]:
    """annotations/instances_<split>.json and <split>/<id>.jpg with each object painted in its class's colour."""
    data = coco_json(images)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    rng = np.random.default_rng(seed)
    for image_id, anns in images:
        img = (rng.random((H, W, 3)) * 60).astype(np.uint8)
        for _, category_id, _, _, rects in anns:
            img[expected_mask(rects)] = COLOURS[category_id]
        Image.fromarray(img).save(root / split / f"{image_id:012d}.jpg", quality=95)
    return data


def write_coco(root: Path) -> Path:
    """The tiny set: splits `train` (7 images) and `val` (3 images), as the development set names them."""
    write_split(root, "train", TRAIN_IMAGES, seed=0)
    write_split(root, "val", VAL_IMAGES, seed=1)
    return root
