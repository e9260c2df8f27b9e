"""Test helpers: a small VOC-layout folder written by the tests themselves (no download, no generator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("square", "disk")


def _palette() -> list[int]:
    pal = [0] * 768
    pal[3:6] = [128, 0, 0]
    pal[6:9] = [0, 128, 0]
    pal[765:768] = [224, 224, 192]  # VOC's void colour
    return pal


def _xml(image_id: str, size: tuple[int, int], objects: list[tuple[str, int, tuple[int, int, int, int]]]) -> str:
    objs = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, difficult, b in objects
    )
    h, w = size
    return (
        f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
        f"<depth>3</depth></size><segmented>1</segmented>{objs}</annotation>"
    )


def write_voc(root: Path, num_images: int = 8, size: int = 64, difficult_first: bool = True) -> Path:
    """A VOC folder: image i has a square (class 1) and, for odd i, a disk (class 2); 255 bands around both.

    The first image's disk-less square is marked difficult when `difficult_first`.
    Splits: the first 3/4 of the ids are train, the rest val (Main and Segmentation alike).
    """
    for d in ("JPEGImages", "Annotations", "SegmentationObject", "SegmentationClass", "ImageSets/Main",
              "ImageSets/Segmentation"):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = [f"2024_{i:06d}" for i in range(num_images)]
    yy, xx = np.mgrid[:size, :size]
    for i, image_id in enumerate(ids):
        img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        obj = np.zeros((size, size), np.uint8)
        cls = np.zeros((size, size), np.uint8)
        objects = []
        s0 = 8 + (i % 3) * 2
        square = (yy >= s0) & (yy < s0 + 20) & (xx >= s0) & (xx < s0 + 20)
        img[square] = (220, 60, 60)
        obj[square], cls[square] = 1, 1
        objects.append(("square", int(difficult_first and i == 0), (s0 + 1, s0 + 1, s0 + 20, s0 + 20)))
        masks = [square]
        if i % 2 == 1:
            disk = (yy - 44) ** 2 + (xx - 44) ** 2 < 10**2
            img[disk] = (60, 200, 60)
            obj[disk], cls[disk] = 2, 2
            ys, xs = np.nonzero(disk)
            objects.append(("disk", 0, (xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1)))
            masks.append(disk)
        for m in masks:  # a 1-px void band on the outside of each object, as VOC draws them
            ring = np.zeros_like(m)
            ring[1:, :] |= m[:-1, :]
            ring[:-1, :] |= m[1:, :]
            ring[:, 1:] |= m[:, :-1]
            ring[:, :-1] |= m[:, 1:]
            ring &= ~m
            ring &= obj == 0
            obj[ring], cls[ring] = 255, 255
        Image.fromarray(img).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        for folder, arr in (("SegmentationObject", obj), ("SegmentationClass", cls)):
            png = Image.fromarray(arr, mode="P")
            png.putpalette(_palette())
            png.save(root / folder / f"{image_id}.png")
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, (size, size), objects))
    n_train = num_images * 3 // 4
    for task in ("Main", "Segmentation"):
        (root / "ImageSets" / task / "train.txt").write_text("\n".join(ids[:n_train]) + "\n")
        (root / "ImageSets" / task / "val.txt").write_text("\n".join(ids[n_train:]) + "\n")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
    return root


# The peak-stimulation head settings of conf/train.yaml, for tests that build a PRMModule directly.
HEAD = {"stimulation": True, "window": 3, "peak_filter": "median", "sub_pixel_factor": 1, "full_peak_gradient": True}


def fp32_sum_bound(n: int, magnitude: float) -> float:
    """Worst-case absolute error of an fp32 sum of `n` terms whose absolute values add up to `magnitude`
    (Higham's first-order bound n * u * sum|x|, u = 2^-24). A tolerance from the arithmetic holds on every CPU,
    whatever order its BLAS accumulates in; one read off a single CPU does not."""
    return n * 2.0**-24 * magnitude
