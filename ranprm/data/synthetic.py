"""The embedded dataset: a deterministic synthetic weak-supervision task written in PASCAL VOC 2012 layout.

`ensure_dataset(SyntheticSpec())` returns a folder that reads exactly like `VOCdevkit/VOC2012`:

```
<root>/
  JPEGImages/<id>.jpg           RGB, JPEG quality `spec.jpeg_quality` (90); width and height each drawn in
                                [S(1 - size_jitter), S(1 + size_jitter)] around the nominal size S
  Annotations/<id>.xml          VOC schema: <filename>, <size>, <segmented>1, one <object> per instance
                                with <name>, <pose>, <truncated>, <difficult>, 1-based inclusive <bndbox>
  SegmentationObject/<id>.png   palette ("P") PNG, VOC colour map: 0 background, instance ids 1..N in the
                                order of the XML objects, 255 void band
  SegmentationClass/<id>.png    the same with class ids 1..C (index in CLASS_NAMES + 1)
  ImageSets/Main/{train,val,trainval}.txt          one id per line
  ImageSets/Main/<class>_{train,val,trainval}.txt  "<id>  1" present, "<id>  0" only difficult, "<id> -1" not
  ImageSets/Segmentation/{train,val,trainval}.txt  the same ids as Main: every image has masks here
  spec.json                     the spec, generator version and class names; written last
```

Ids are `train_00000`, ... and `val_00000`, ...; each image's random stream is seeded from
(seed, split, index), so the validation images stay the same when `num_train` changes.

What an image holds:
- a cluttered background: a colour gradient, low- and mid-frequency colour noise, random lines and
  translucent blobs, then up to `max_distractors` opaque distractor shapes of no class (elongated ellipses,
  bars, irregular blobs, crescents), a share `distractor_class_texture_prob` of them painted like one of the
  classes (its texture and hue) so that appearance alone does not name a class;
- 1 to `max_instances` objects, each with a random scale, aspect, rotation, position and two colours.
  A class is a shape, a texture (CLASS_TEXTURES) and a hue family (CLASS_HUES: one light and one dark colour
  near the class hue). Distractors that wear a class texture wear its hue too, so only the shape separates
  them from the class. With `class_colours=False` colours are random and carry no information: a from-scratch
  network then needs far more than a few hundred images to learn anything. Classes are drawn
  uniformly, so with several objects one class often repeats. Objects are painted in XML order, so later
  objects occlude earlier ones and an instance's mask is its visible part. An object whose visible part is
  tiny (under `min_visible_fraction` of its area, or too few non-void pixels) is left out of the picture
  altogether, so the picture, the XML and the masks always agree. An object with less than
  `difficult_visible_fraction` of its area visible (occluded or cut by the frame) is marked `<difficult>1`;
  it stays an instance in the masks.

The void band: 255 covers every pixel within `void_width // 2` px (an elliptical neighbourhood) of a change
of instance label, on both sides: object/background edges, occlusion edges between instances and the inner
edge of a ring. With the default `void_width=2` that is one pixel inside and one outside each boundary, 2 px
in all at ~192 px images, like the ~5 px band of VOC's ~500 px images. Thin parts (star tips, slivers) can
vanish into the band whole. The image frame itself gets no band. Each `<bndbox>` is the tight box of its
instance's non-void pixels in SegmentationObject.
"""

from __future__ import annotations

import colorsys
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ranprm.data.voc import image_path
from ranprm.errors import ConfigError, DataError

try:  # POSIX advisory locks keep two processes (DDP ranks) from generating the same dataset twice
    import fcntl
except ImportError:  # pragma: no cover - Windows: the atomic rename alone still keeps the folder whole
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# Bump whenever the pictures, masks or files change for the same spec: the cache key includes it.
GENERATOR_VERSION = 2

CLASS_NAMES: tuple[str, ...] = ("disk", "square", "triangle", "star", "ring", "cross")
# Each class has its own shape and its own texture; both rotate and scale with the object.
CLASS_TEXTURES: dict[str, str] = {
    "disk": "dots",
    "square": "stripes",
    "triangle": "checker",
    "star": "rings",
    "ring": "grid",
    "cross": "zigzag",
}
# Hue (degrees) around which each class's two colours are drawn when `SyntheticSpec.class_colours` is on.
CLASS_HUES: dict[str, float] = {name: 60.0 * i for i, name in enumerate(CLASS_NAMES)}
DISTRACTOR_SHAPES: tuple[str, ...] = ("ellipse", "bar", "blob", "crescent")
VOID = 255
SPLITS: tuple[str, ...] = ("train", "val")

_Polygons = list[tuple[np.ndarray, int]]  # (K, 2) float vertices in local units, fill value (1 paint, 0 cut)


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that defines the embedded dataset; any change gives a new cache folder.

    Sizes are in pixels; fractions are of an object's full (unoccluded, unclipped) area.
    """

    num_train: int = 400
    num_val: int = 100
    image_size: int = 192  # nominal side S; width and height vary around it
    seed: int = 0
    max_instances: int = 4  # objects per image are drawn uniformly in 1..max_instances
    size_jitter: float = 0.15  # width, height in [S(1 - j), S(1 + j)]
    object_scale: tuple[float, float] = (0.13, 0.28)  # object radius as a fraction of min(width, height)
    max_distractors: int = 3
    # Share of distractors painted with a class texture, so that texture alone does not name a class.
    distractor_class_texture_prob: float = 0.5
    # Each class paints in its own hue family (CLASS_HUES) on top of its shape and texture; a distractor with a
    # class texture takes that class's hue too, so neither colour nor texture alone names a class. False: random
    # colours, a much harder task that a from-scratch CNN does not learn from a few hundred images.
    class_colours: bool = True
    void_width: int = 2  # total width of the 255 band across a boundary (even: half inside, half outside)
    min_visible_fraction: float = 0.25  # below this an occluded object is dropped from the image
    difficult_visible_fraction: float = 0.5  # below this a kept object is marked difficult
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        # Hydra/YAML hands lists, not tuples; normalise so the spec stays hashable and its key stable.
        object.__setattr__(self, "object_scale", tuple(float(v) for v in self.object_scale))
        checks = [
            (self.num_train >= 1 and self.num_val >= 1, "num_train and num_val must be >= 1"),
            (self.image_size >= 32, "image_size must be >= 32"),
            (1 <= self.max_instances <= 20, "max_instances must lie in 1..20"),
            (0.0 <= self.size_jitter < 0.5, "size_jitter must lie in [0, 0.5)"),
            (
                len(self.object_scale) == 2 and 0.02 <= self.object_scale[0] <= self.object_scale[1] <= 0.45,
                "object_scale must be (low, high) with 0.02 <= low <= high <= 0.45",
            ),
            (self.max_distractors >= 0, "max_distractors must be >= 0"),
            (
                0.0 <= self.distractor_class_texture_prob <= 1.0,
                "distractor_class_texture_prob must lie in [0, 1]",
            ),
            (self.void_width >= 0 and self.void_width % 2 == 0, "void_width must be an even number >= 0"),
            (
                0.0 < self.min_visible_fraction <= self.difficult_visible_fraction <= 1.0,
                "need 0 < min_visible_fraction <= difficult_visible_fraction <= 1",
            ),
            (1 <= self.jpeg_quality <= 100, "jpeg_quality must lie in 1..100"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"data.synthetic: {message} (got {self})")

    def key(self) -> str:
        """Cache folder name: generator version plus a hash of every field."""
        blob = json.dumps({"version": GENERATOR_VERSION, "spec": asdict(self)}, sort_keys=True)
        return f"v{GENERATOR_VERSION}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def ids(self, split: str) -> list[str]:
        count = {"train": self.num_train, "val": self.num_val}[split]
        return [f"{split}_{i:05d}" for i in range(count)]


@dataclass(frozen=True)
class SyntheticObject:
    """One annotated instance of a generated image (what its XML <object> says)."""

    name: str
    difficult: bool
    truncated: bool
    box: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax: 1-based, inclusive, as VOC writes them


@dataclass
class SyntheticSample:
    """One generated image and its annotation, before it is written to disk."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    instances: np.ndarray  # (H, W) uint8: 0 background, 1..N instance ids, 255 void
    classes: np.ndarray  # (H, W) uint8: 0 background, 1-based class ids, 255 void
    objects: list[SyntheticObject]  # in instance-id order


# --------------------------------------------------------------------------------------------------- drawing


def voc_palette() -> list[int]:
    """VOC's 256-colour map as a flat [r0, g0, b0, r1, ...] list: the bits of the index spread over RGB."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


_PALETTE = voc_palette()


def _regular(n: int, radius: float, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2.0 * np.pi * np.arange(n) / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * radius


def _class_polygons(name: str) -> _Polygons:
    """Class shapes in local units (radius ~1), sized so that their areas are comparable."""
    if name == "disk":
        return [(_regular(64, 1.0), 1)]
    if name == "square":
        return [(_regular(4, 1.15, np.pi / 4), 1)]
    if name == "triangle":
        return [(_regular(3, 1.25, -np.pi / 2), 1)]
    if name == "star":
        radii = np.where(np.arange(10) % 2 == 0, 1.25, 0.55)
        return [(_regular(10, 1.0, -np.pi / 2) * radii[:, None], 1)]
    if name == "ring":
        # The hole shows the background, so the ring's mask has a hole (and a void band on its inner edge).
        return [(_regular(64, 1.05), 1), (_regular(64, 0.55), 0)]
    if name == "cross":
        a, w = 1.1, 0.36
        pts = [
            (w, -a),
            (w, -w),
            (a, -w),
            (a, w),
            (w, w),
            (w, a),
            (-w, a),
            (-w, w),
            (-a, w),
            (-a, -w),
            (-w, -w),
        ]
        return [(np.array([*pts, (-w, -a)], dtype=np.float64), 1)]
    raise ValueError(f"unknown class {name!r}")


def _distractor_polygons(kind: str, rng: np.random.Generator) -> _Polygons:
    """Shapes of no class, chosen to look unlike every class shape when fully visible."""
    if kind == "ellipse":
        return [(_regular(48, 1.0) * [1.0, rng.uniform(0.25, 0.5)], 1)]
    if kind == "bar":
        return [
            (
                np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]) * [1.0, rng.uniform(0.1, 0.25)],
                1,
            )
        ]
    if kind == "blob":
        angles = 2.0 * np.pi * np.arange(48) / 48
        radius = np.ones(48)
        for freq in (2, 3):
            radius += rng.uniform(0.2, 0.35) * np.sin(freq * angles + rng.uniform(0, 2 * np.pi))
        return [(np.stack([np.cos(angles), np.sin(angles)], axis=1) * radius[:, None], 1)]
    if kind == "crescent":
        return [(_regular(48, 1.0), 1), (_regular(48, 0.85) + [0.45, 0.0], 0)]
    raise ValueError(f"unknown distractor {kind!r}")


@dataclass(frozen=True)
class _Placement:
    """Where a shape lands: local (u, v) -> image (x, y) = centre + R(theta) @ (u * rx, v * ry)."""

    cx: float
    cy: float
    rx: float
    ry: float
    theta: float

    def to_image(self, pts: np.ndarray) -> np.ndarray:
        c, s = np.cos(self.theta), np.sin(self.theta)
        u, v = pts[:, 0] * self.rx, pts[:, 1] * self.ry
        return np.stack([self.cx + c * u - s * v, self.cy + s * u + c * v], axis=1)

    def to_local(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = np.cos(self.theta), np.sin(self.theta)
        dx, dy = xs - self.cx, ys - self.cy
        return (c * dx + s * dy) / self.rx, (-s * dx + c * dy) / self.ry


def _rasterise(polygons: _Polygons, place: _Placement, shape: tuple[int, int]) -> tuple[np.ndarray, bool, float]:
    """(mask (H, W) bool, cut by the image frame, full area in px including any part outside the frame)."""
    mask = np.zeros(shape, np.uint8)
    truncated, area = False, 0.0
    h, w = shape
    for pts, value in polygons:
        xy = place.to_image(pts)
        # 4 fractional bits so small shapes keep their outline instead of snapping to whole pixels.
        cv2.fillPoly(mask, [np.round(xy * 16).astype(np.int32)], int(value), lineType=cv2.LINE_8, shift=4)
        poly_area = abs(float(cv2.contourArea(xy.astype(np.float32))))
        area += poly_area if value else -poly_area
        if value:
            truncated |= bool((xy[:, 0] < 0).any() or (xy[:, 0] > w - 1).any())
            truncated |= bool((xy[:, 1] < 0).any() or (xy[:, 1] > h - 1).any())
    return mask.astype(bool), truncated, max(area, 1.0)


def _texture(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A two-tone pattern in [0, 1] over local coordinates, ~2-3 periods per unit radius."""
    f = rng.uniform(2.0, 3.0)
    p, q = rng.uniform(0.0, 1.0, 2)
    if kind == "dots":
        du, dv = np.mod(u * f + p, 1.0) - 0.5, np.mod(v * f + q, 1.0) - 0.5
        return (du * du + dv * dv < 0.09).astype(np.float32)
    if kind == "stripes":
        return (np.mod(u * f + p, 1.0) < 0.5).astype(np.float32)
    if kind == "checker":
        return np.mod(np.floor(u * f + p) + np.floor(v * f + q), 2.0).astype(np.float32)
    if kind == "rings":
        return (np.mod(np.hypot(u, v) * f * 1.3 + p, 1.0) < 0.5).astype(np.float32)
    if kind == "grid":
        return ((np.mod(u * f + p, 1.0) < 0.25) | (np.mod(v * f + q, 1.0) < 0.25)).astype(np.float32)
    if kind == "zigzag":
        return (np.mod(u * f + 1.2 * np.abs(np.mod(v * f * 0.7 + q, 1.0) - 0.5) + p, 1.0) < 0.5).astype(np.float32)
    if kind == "noise":
        small = rng.uniform(0.0, 1.0, (8, 8)).astype(np.float32)
        return cv2.resize(small, (u.shape[1], u.shape[0]), interpolation=cv2.INTER_LINEAR)
    if kind == "flat":
        return np.zeros_like(u, dtype=np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _two_colours(rng: np.random.Generator, hue: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours far enough apart that the texture stays visible after JPEG.

    With `hue` (degrees) both lie within +-15 degrees of it, one light and one dark; without, they are random.
    """
    if hue is not None:
        light = _hsv_to_rgb(hue + rng.uniform(-15, 15), rng.uniform(0.35, 0.7), rng.uniform(0.85, 1.0))
        dark = _hsv_to_rgb(hue + rng.uniform(-15, 15), rng.uniform(0.7, 1.0), rng.uniform(0.25, 0.5))
        return (light, dark) if rng.random() < 0.5 else (dark, light)
    c0 = rng.uniform(0, 255, 3)
    while True:
        c1 = rng.uniform(0, 255, 3)
        if np.abs(c0 - c1).sum() >= 180:
            return c0.astype(np.float32), c1.astype(np.float32)


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue % 360.0) / 360.0, saturation, value), np.float32) * 255.0


def _paint(
    canvas: np.ndarray,
    mask: np.ndarray,
    place: _Placement,
    texture: str,
    rng: np.random.Generator,
    hue: float | None = None,
) -> None:
    """Paint a textured, softly shaded shape into `canvas` (H, W, 3) float32 where `mask` is set."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    u, v = place.to_local(gx, gy)
    # A texture frame turned a little from the shape's own so a texture is not locked to one edge.
    turn = rng.uniform(-0.4, 0.4)
    tu, tv = np.cos(turn) * u - np.sin(turn) * v, np.sin(turn) * u + np.cos(turn) * v
    t = _texture(texture, tu, tv, rng)[..., None]
    c0, c1 = _two_colours(rng, hue)
    light = rng.uniform(0, 2 * np.pi)
    shade = 1.0 + 0.12 * (np.cos(light) * u + np.sin(light) * v)[..., None]
    patch = np.clip((c0 * (1.0 - t) + c1 * t) * shade, 0, 255)
    region = mask[y0:y1, x0:x1]
    canvas[y0:y1, x0:x1][region] = patch[region]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradient + colour noise at two scales + lines + translucent blobs, (H, W, 3) float32."""
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * gx / w + np.sin(angle) * gy / h
    t = ((t - t.min()) / max(float(np.ptp(t)), 1e-6))[..., None]
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    img = (c0 * (1 - t) + c1 * t).astype(np.float32)
    for cells, amplitude in ((int(rng.integers(3, 7)), 45.0), (int(rng.integers(12, 24)), 18.0)):
        noise = rng.uniform(-1.0, 1.0, (cells, cells, 3)).astype(np.float32)
        img += amplitude * cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(3, 9))):
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(img, p0, p1, rng.uniform(0, 255, 3).tolist(), int(rng.integers(1, 4)), cv2.LINE_AA)
    overlay = img.copy()
    for _ in range(int(rng.integers(2, 6))):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(w // 12, w // 4)), int(rng.integers(h // 12, h // 4)))
        cv2.ellipse(overlay, centre, axes, float(rng.uniform(0, 180)), 0, 360, rng.uniform(0, 255, 3).tolist(), -1)
    alpha = rng.uniform(0.25, 0.5)
    return np.clip((1 - alpha) * img + alpha * overlay, 0, 255)


def _void_band(labels: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: pixels within width // 2 of a change of label, on both sides of it."""
    half = width // 2
    if half == 0:
        return np.zeros(labels.shape, bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * half + 1, 2 * half + 1))
    # Max != min over the neighbourhood marks both sides of every edge; OpenCV's default border values make
    # the image frame itself no edge.
    return cv2.dilate(labels, kernel) != cv2.erode(labels, kernel)


def _random_placement(
    rng: np.random.Generator, h: int, w: int, scale: tuple[float, float], margin: float
) -> _Placement:
    r = rng.uniform(*scale) * min(h, w)
    aspect = rng.uniform(0.8, 1.0)
    rx, ry = (r, r * aspect) if rng.random() < 0.5 else (r * aspect, r)
    # A centre at least `margin` radii inside the frame: some objects are cut by it, none mostly.
    cx = rng.uniform(margin * r, max(margin * r + 1, w - margin * r))
    cy = rng.uniform(margin * r, max(margin * r + 1, h - margin * r))
    return _Placement(cx, cy, rx, ry, rng.uniform(0, 2 * np.pi))


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1


def _class_hue(spec: SyntheticSpec, name: str) -> float | None:
    return CLASS_HUES[name] if spec.class_colours else None


def render_sample(spec: SyntheticSpec, split: str, index: int) -> SyntheticSample:
    """Generate one image and its annotation; a pure function of (spec, split, index)."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
    s = spec.image_size
    w, h = (int(round(s * rng.uniform(1 - spec.size_jitter, 1 + spec.size_jitter))) for _ in range(2))
    min_core = max(16, int(0.002 * h * w))  # an instance needs this many non-void pixels to be kept

    for _attempt in range(100):
        n = int(rng.integers(1, spec.max_instances + 1))
        names = [CLASS_NAMES[int(i)] for i in rng.integers(0, len(CLASS_NAMES), n)]
        places = [_random_placement(rng, h, w, spec.object_scale, margin=0.6) for _ in names]
        shapes = [_rasterise(_class_polygons(name), p, (h, w)) for name, p in zip(names, places, strict=True)]
        keep = list(range(n))
        # Drop the objects whose visible part is too small and look again: dropping one only uncovers others.
        while keep:
            labels = np.zeros((h, w), np.uint8)
            for slot, k in enumerate(keep, start=1):
                labels[shapes[k][0]] = slot
            band = _void_band(labels, spec.void_width)
            visible = [labels == slot for slot in range(1, len(keep) + 1)]
            cores = [m & ~band for m in visible]
            bad = {
                k
                for k, vis, core in zip(keep, visible, cores, strict=True)
                if vis.sum() < spec.min_visible_fraction * shapes[k][2] or core.sum() < min_core
            }
            if not bad:
                break
            keep = [k for k in keep if k not in bad]
        if keep:
            break
    else:  # pragma: no cover - the last object is never occluded, so this needs a broken spec
        raise DataError(f"synthetic image {split}/{index}: no object stayed visible in 100 attempts")

    image = _background(rng, h, w)
    for _ in range(int(rng.integers(0, spec.max_distractors + 1))):
        kind = DISTRACTOR_SHAPES[int(rng.integers(len(DISTRACTOR_SHAPES)))]
        place = _random_placement(rng, h, w, (0.6 * spec.object_scale[0], 0.8 * spec.object_scale[1]), 0.0)
        mask, _, _ = _rasterise(_distractor_polygons(kind, rng), place, (h, w))
        if rng.random() < spec.distractor_class_texture_prob:  # a hard negative: a class's look, no class shape
            mimic = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
            texture, hue = CLASS_TEXTURES[mimic], _class_hue(spec, mimic)
        else:
            texture, hue = ["flat", "noise"][int(rng.integers(2))], None
        _paint(image, mask, place, texture, rng, hue)
    for k in keep:
        _paint(image, shapes[k][0], places[k], CLASS_TEXTURES[names[k]], rng, _class_hue(spec, names[k]))
    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)  # sensor noise: no perfectly flat areas
    image_u8 = np.clip(np.round(image), 0, 255).astype(np.uint8)

    instances = labels.copy()
    classes = np.zeros_like(labels)
    objects = []
    for slot, k in enumerate(keep, start=1):
        classes[visible[slot - 1]] = CLASS_NAMES.index(names[k]) + 1
        objects.append(
            SyntheticObject(
                name=names[k],
                difficult=bool(visible[slot - 1].sum() < spec.difficult_visible_fraction * shapes[k][2]),
                truncated=shapes[k][1],
                box=_tight_box(cores[slot - 1]),
            )
        )
    instances[band] = VOID
    classes[band] = VOID
    return SyntheticSample(image=image_u8, instances=instances, classes=classes, objects=objects)


# --------------------------------------------------------------------------------------------------- writing


def annotation_xml(image_id: str, width: int, height: int, objects: list[SyntheticObject]) -> bytes:
    """The VOC 2012 XML of one image (tab-indented like VOC's own files)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "ranprm synthetic"
    ET.SubElement(source, "annotation").text = f"ranprm synthetic v{GENERATOR_VERSION}"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj.name
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(obj.truncated))
        ET.SubElement(node, "difficult").text = str(int(obj.difficult))
        box = ET.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.box, strict=True):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _save_palette_png(array: np.ndarray, path: Path) -> None:
    h, w = array.shape
    img = Image.frombytes("P", (w, h), np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    img.putpalette(_PALETTE)
    img.save(path, format="PNG")


def _write_sample(job: tuple[SyntheticSpec, str, int, str]) -> tuple[str, list[tuple[str, bool]]]:
    """Render and write one image's four files; return (id, [(class, difficult), ...]) for the lists."""
    spec, split, index, root_str = job
    root = Path(root_str)
    image_id = f"{split}_{index:05d}"
    sample = render_sample(spec, split, index)
    h, w = sample.instances.shape
    Image.frombytes("RGB", (w, h), np.ascontiguousarray(sample.image).tobytes()).save(
        image_path(root, image_id), format="JPEG", quality=spec.jpeg_quality
    )
    (root / "Annotations" / f"{image_id}.xml").write_bytes(annotation_xml(image_id, w, h, sample.objects))
    _save_palette_png(sample.instances, root / "SegmentationObject" / f"{image_id}.png")
    _save_palette_png(sample.classes, root / "SegmentationClass" / f"{image_id}.png")
    return image_id, [(o.name, o.difficult) for o in sample.objects]


def _write_lists(root: Path, labels: dict[str, dict[str, list[tuple[str, bool]]]]) -> None:
    main, seg = root / "ImageSets" / "Main", root / "ImageSets" / "Segmentation"
    splits = {"train": list(labels["train"]), "val": list(labels["val"])}
    splits["trainval"] = splits["train"] + splits["val"]
    merged = {**labels["train"], **labels["val"]}
    for split, ids in splits.items():
        text = "".join(f"{i}\n" for i in ids)
        (main / f"{split}.txt").write_text(text)
        (seg / f"{split}.txt").write_text(text)
        for name in CLASS_NAMES:
            lines = []
            for i in ids:
                flags = [difficult for cls, difficult in merged[i] if cls == name]
                # VOC: 1 present, 0 present only as difficult objects, -1 absent; right-aligned in 2 columns.
                flag = -1 if not flags else (0 if all(flags) else 1)
                lines.append(f"{i} {flag:2d}\n")
            (main / f"{name}_{split}.txt").write_text("".join(lines))


def generate(spec: SyntheticSpec, root: str | Path, workers: int = 1) -> Path:
    """Write the whole dataset into `root` (created if needed) and return `root`.

    Not atomic by itself: `ensure_dataset` calls it on a temporary folder.
    """
    root = Path(root)
    for sub in ("JPEGImages", "Annotations", "SegmentationObject", "SegmentationClass"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("Main", "Segmentation"):
        (root / "ImageSets" / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(spec, split, i, str(root)) for split in SPLITS for i in range(len(spec.ids(split)))]
    if workers > 1:
        # Spawn, not fork: the caller may be a multithreaded process (torch, DataLoader workers).
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_write_sample, jobs, chunksize=16))
    else:
        results = [_write_sample(job) for job in jobs]
    labels: dict[str, dict[str, list[tuple[str, bool]]]] = {split: {} for split in SPLITS}
    for (_, split, _, _), (image_id, objs) in zip(jobs, results, strict=True):
        labels[split][image_id] = objs
    _write_lists(root, labels)
    # Last: a folder with spec.json is complete.
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "class_names": list(CLASS_NAMES),
    }
    (root / "spec.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return root


# --------------------------------------------------------------------------------------------------- caching


def default_cache_dir() -> Path:
    """`$RANPRM_CACHE`, else `~/.cache/ranprm`."""
    return Path(os.environ.get("RANPRM_CACHE") or "~/.cache/ranprm").expanduser()


def dataset_dir(spec: SyntheticSpec, cache_dir: str | Path | None = None) -> Path:
    """Where `ensure_dataset` keeps this spec's dataset: `<cache_dir>/synthetic/<version-hash>`."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / "synthetic" / spec.key()


def is_complete(root: Path, spec: SyntheticSpec) -> bool:
    """True when `root` holds this spec's finished dataset (spec.json matches, every JPEG is there)."""
    try:
        manifest = json.loads((root / "spec.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("generator_version") != GENERATOR_VERSION or manifest.get("spec") != json.loads(
        json.dumps(asdict(spec))
    ):
        return False
    jpegs = root / "JPEGImages"
    return jpegs.is_dir() and len(os.listdir(jpegs)) == spec.num_train + spec.num_val


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path`; the OS releases it if the process dies."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_dataset(spec: SyntheticSpec, cache_dir: str | Path | None = None, workers: int = 1) -> Path:
    """Return the root of the spec's dataset (the folder holding JPEGImages/...), generating it if needed.

    The dataset lives in `dataset_dir(spec, cache_dir)`; a changed spec or GENERATOR_VERSION gives another
    folder, so it is regenerated, and an unchanged one is reused without touching it. Generation writes into a
    temporary sibling folder and renames it into place when complete, so a killed run never leaves a folder
    that looks complete. Concurrent callers (DDP ranks) serialise on a lock file; without locks the loser
    of the rename race uses the winner's folder.

    One process renders the default spec in ~5 s; `workers > 1` spawns a pool, which pays only for much
    larger specs and needs the usual `if __name__ == "__main__":` guard in a calling script.
    """
    root = dataset_dir(spec, cache_dir)
    if is_complete(root, spec):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(root.parent / f".{root.name}.lock"):
        if is_complete(root, spec):  # another process finished it while we waited
            return root
        if fcntl is not None:  # we hold the lock: leftovers of killed generations are garbage
            for stale in root.parent.glob(f".{root.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        if root.exists():  # damaged (files deleted by hand): move it aside, then rebuild
            trash = root.parent / f".{root.name}.tmp-old-{uuid.uuid4().hex[:8]}"
            os.rename(root, trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        log.info("generating the synthetic dataset (%d images) in %s", spec.num_train + spec.num_val, root)
        start = time.perf_counter()
        try:
            generate(spec, tmp, workers=workers)
            try:
                os.rename(tmp, root)
            except OSError:
                if not is_complete(root, spec):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # lost the race; the winner's folder is identical
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("synthetic dataset ready in %.1f s", time.perf_counter() - start)
    return root
