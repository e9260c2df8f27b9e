"""Segment proposals for PRM's instance retrieval, from OpenCV contrib's selective search.

PRM scores *segment* proposals (the paper used MCG, which is not shipped). Selective search (Uijlings et al.
2013, `cv2.ximgproc.segmentation`) only returns boxes, so each box is turned into a mask.

Box -> mask rule
    Selective search starts from graph-based segmentations (Felzenszwalb-Huttenlocher) and merges their
    segments hierarchically; every box is the bounding box of a merged region. We recompute the first starting
    segmentation OpenCV uses in every mode (the HSV image, `k = base_k`, `sigma`, OpenCV's `min_size` of
    100 px) and call its segments *superpixels*. A box's mask is

        mask(box) = box  AND  union{ superpixel s : |s inside box| >= min_inside * |s| }

    A region of that hierarchy is a union of superpixels lying wholly inside its box, so for those boxes the
    rule recovers the region's superpixels plus any other superpixel the box happens to enclose. Boxes from
    the other colour spaces and k values do not align with these superpixels; the majority vote (`min_inside`,
    default 0.5) keeps the superpixels that belong to the box more than to its outside, and clipping to the
    box is exact because a region never leaves its own bounding box. Boxes that keep no superpixel give an
    empty mask and are dropped; identical masks are kept once.

Rank order
    PRM scores only the first `retrieval.proposal_count` proposals of a ranked list (MCG's, in the paper), so
    the masks come out in a defined rank order (`rank`):
    - `opencv` (default): selective search's own order as OpenCV implements it. OpenCV gives every region of
      every hierarchy the rank `rand() * level` (level 1 = a starting segment, +1 per merge) from the C library's
      `rand()`, sorts ascending and drops repeated boxes: a randomised order that favours regions low in the
      hierarchy (OpenCV notes it is inverted from the paper, which favours the top). `rand()` cannot be seeded
      from OpenCV's Python API, so ranprm seeds it with `seed + 1` (the C library's `srand`, through ctypes;
      glibc treats seeds 0 and 1 alike) right before each search: the order is then reproducible on one C
      library (glibc, musl, macOS).
    - `random`: the boxes sorted lexicographically (a canonical order), then shuffled by
      `numpy.random.default_rng(seed)`: reproducible on every platform, no bias by level.
    Boxes are turned into masks in that order; empty masks are dropped and a mask equal to an earlier one is
    dropped (the first occurrence keeps its rank). At most the first `max_proposals` masks are kept.

Speed
    The search and the masks run on a copy down-scaled (INTER_AREA) so that its longer side is at most
    `max_side`; the masks come back to the image size by nearest-neighbour (pixel-centre) sampling.
    Measured on one CPU thread (a 500x375 photo, fast mode): max_side 256 gives ~600 proposals in ~0.6 s;
    full size ~1600 in ~2 s; quality mode roughly triples both. At 200x150: ~420 proposals in ~0.16 s.

Cache
    With `cache_dir` (the retrieval config's `cache_dir`), the low-resolution masks are stored as `np.packbits`
    rows in a compressed `.npz` named by a SHA-256 key over the image bytes and shape, every search option, the
    number of masks built, the OpenCV version and a format version. Writes go to a temporary file in the same
    folder, renamed into place (`os.replace`): a reader never sees a partial file and concurrent writers are
    harmless. An unreadable file is recomputed and replaced.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from ranprm.errors import ConfigError

_MODES = ("fast", "quality", "single")
_RANKS = ("opencv", "random")
# Bump when the stored layout or the box -> mask rule changes: old cache files then simply miss.
# 2: masks in rank order (1: sorted by their bytes, a seeded random subset beyond max_proposals).
_CACHE_FORMAT = 2
# OpenCV's selective search builds its graph segmentations with createGraphSegmentation()'s default min_size.
_OPENCV_MIN_SIZE = 100
# Boxes converted per chunk: bounds the (chunk, h, w) bool temporary.
_BOX_CHUNK = 256
# srand + search must not interleave with another thread's: the C library's rand() state is process-wide.
_RAND_LOCK = threading.Lock()


@dataclass(frozen=True)
class SelectiveSearchConfig:
    """Options of selective-search mask proposals (config keys of `retrieval.search`).

    mode:           fast | quality | single: OpenCV's switchToSelectiveSearchFast / ...Quality /
                    switchToSingleStrategy
    max_proposals:  build at most this many unique masks, the first in rank order
    max_side:       search on a copy whose longer side is at most this many pixels; null: full size
    min_inside:     a superpixel joins a box's mask when at least this fraction of its pixels lie in the box
    base_k, inc_k, sigma: OpenCV's graph-segmentation scale parameters (its defaults 150, 150, 0.8)
    rank:           opencv | random: the rank order of the proposals (module docstring)
    seed:           seeds the rank: the C library's rand() for `opencv`, the shuffle for `random`
    """

    mode: str = "fast"
    max_proposals: int = 1000
    max_side: int | None = 256
    min_inside: float = 0.5
    base_k: int = 150
    inc_k: int = 150
    sigma: float = 0.8
    rank: str = "opencv"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ConfigError(f"retrieval.search.mode={self.mode!r} is unknown; choose fast, quality or single")
        if self.rank not in _RANKS:
            raise ConfigError(f"retrieval.search.rank={self.rank!r} is unknown; choose opencv or random")
        if self.max_proposals < 1:
            raise ConfigError(f"retrieval.search.max_proposals={self.max_proposals} must be >= 1")
        if self.max_side is not None and self.max_side < 16:
            raise ConfigError(f"retrieval.search.max_side={self.max_side} must be >= 16 or null")
        if not 0.0 < self.min_inside <= 1.0:
            raise ConfigError(f"retrieval.search.min_inside={self.min_inside} must lie in (0, 1]")
        if self.base_k <= 0 or self.inc_k <= 0 or self.sigma < 0:
            raise ConfigError(
                f"retrieval.search: base_k={self.base_k}, inc_k={self.inc_k} must be > 0 and sigma={self.sigma} >= 0"
            )
        if not 0 <= self.seed < 2**32 - 1:
            raise ConfigError(f"retrieval.search.seed={self.seed} must lie in [0, 2^32 - 1)")


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            "proposals need a uint8 RGB image of shape (H, W, 3), got "
            f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}"
        )


def downscale(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """(H, W, 3) -> (h, w, 3) with max(h, w) <= max_side (INTER_AREA); unchanged when already small enough."""
    h, w = image.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 wants (width, height)
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _c_srand() -> Callable[[int], None] | None:
    """The C library's `srand`, which seeds the `rand()` OpenCV's selective search ranks with; None if unknown."""
    for name in (None, ctypes.util.find_library("c")):
        try:
            return ctypes.CDLL(name).srand
        except (OSError, TypeError, AttributeError):
            continue
    return None


def selective_search_boxes(image: np.ndarray, cfg: SelectiveSearchConfig) -> np.ndarray:
    """Selective-search boxes of an RGB uint8 image (H, W, 3): (B, 4) int64 `[x, y, w, h]`, unique, in rank order.

    The rank is `cfg.rank` (module docstring): OpenCV's own order with its `rand()` seeded, or a seeded shuffle.
    """
    _check_image(image)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))  # OpenCV converts from BGR internally
    if cfg.mode == "fast":
        search.switchToSelectiveSearchFast(cfg.base_k, cfg.inc_k, cfg.sigma)
    elif cfg.mode == "quality":
        search.switchToSelectiveSearchQuality(cfg.base_k, cfg.inc_k, cfg.sigma)
    else:
        search.switchToSingleStrategy(cfg.base_k, cfg.sigma)
    if cfg.rank == "random":
        boxes = np.unique(np.asarray(search.process(), dtype=np.int64).reshape(-1, 4), axis=0)
        return boxes[np.random.default_rng(cfg.seed).permutation(len(boxes))]
    srand = _c_srand()
    if srand is None:
        raise ConfigError(
            "retrieval.search.rank=opencv needs the C library's srand to make OpenCV's order reproducible, and "
            "it was not found on this platform; use retrieval.search.rank=random"
        )
    with _RAND_LOCK:
        srand(cfg.seed + 1)  # glibc seeds 0 and 1 alike; seed + 1 keeps every `seed` distinct
        boxes = np.asarray(search.process(), dtype=np.int64).reshape(-1, 4)
    return boxes  # OpenCV already dropped repeated boxes, keeping the first in its rank


def superpixels(image: np.ndarray, cfg: SelectiveSearchConfig) -> np.ndarray:
    """Label map (H, W) int32 in 0..n-1: selective search's first starting segmentation of an RGB image."""
    _check_image(image)
    hsv = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), cv2.COLOR_BGR2HSV)
    segmenter = cv2.ximgproc.segmentation.createGraphSegmentation(cfg.sigma, float(cfg.base_k), _OPENCV_MIN_SIZE)
    return segmenter.processImage(hsv).astype(np.int32)


def boxes_to_masks(
    labels: np.ndarray, boxes: np.ndarray, min_inside: float = 0.5, limit: int | None = None
) -> np.ndarray:
    """Masks (P, H, W) bool of boxes (B, 4) `[x, y, w, h]` over a superpixel label map (H, W) int, in box order.

    The module docstring's rule: the box AND the superpixels with >= min_inside of their pixels in it.
    Empty masks are dropped and a mask equal to an earlier one is dropped, so the masks keep the boxes' order;
    with `limit`, conversion stops after that many masks.
    """
    h, w = labels.shape
    n = int(labels.max()) + 1 if labels.size else 0
    if len(boxes) == 0 or n == 0:
        return np.zeros((0, h, w), dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=n)
    limit = len(boxes) if limit is None else limit
    kept: list[np.ndarray] = []
    seen: set[bytes] = set()
    for s in range(0, len(boxes), _BOX_CHUNK):
        chunk = boxes[s : s + _BOX_CHUNK]
        x0, y0 = chunk[:, 0], chunk[:, 1]
        x1, y1 = x0 + chunk[:, 2], y0 + chunk[:, 3]
        # Per box one bincount over its window: O(box area) in C, memory O(n) per box (an integral image of the
        # one-hot labels would be O(h * w * n)).
        inside = np.stack(
            [np.bincount(labels[a:b, c:d].ravel(), minlength=n) for a, b, c, d in zip(y0, y1, x0, x1, strict=True)]
        )
        members = inside >= min_inside * sizes[None, :]  # (chunk, n)
        for i in range(len(chunk)):
            mask = np.zeros((h, w), dtype=bool)
            # Only the box window can be set (the mask is clipped to its box): cost O(box area), not O(h * w).
            a, b, c, d = y0[i], y1[i], x0[i], x1[i]
            mask[a:b, c:d] = members[i][labels[a:b, c:d]]
            packed = np.packbits(mask).tobytes()
            if not mask.any() or packed in seen:
                continue
            seen.add(packed)
            kept.append(mask)
            if len(kept) >= limit:
                return np.stack(kept)
    return np.stack(kept) if kept else np.zeros((0, h, w), dtype=bool)


def upsample_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour (pixel-centre) resize of masks (P, h, w) to (P, H, W)."""
    h, w = masks.shape[1:]
    big_h, big_w = size
    if (h, w) == (big_h, big_w):
        return masks
    ri = np.minimum(((np.arange(big_h) + 0.5) * h / big_h).astype(np.int64), h - 1)
    ci = np.minimum(((np.arange(big_w) + 0.5) * w / big_w).astype(np.int64), w - 1)
    # Two 1-D gathers: about twice as fast as one 2-D fancy index.
    return masks.take(ri, axis=1).take(ci, axis=2)


def _count(cfg: SelectiveSearchConfig, limit: int | None) -> int:
    """How many masks to build: `max_proposals`, or fewer when the caller scores fewer (`limit`)."""
    return cfg.max_proposals if limit is None else min(cfg.max_proposals, int(limit))


def low_res_proposals(image: np.ndarray, cfg: SelectiveSearchConfig, limit: int | None = None) -> np.ndarray:
    """Proposal masks (P, h, w) bool at the search resolution (see `downscale`), in rank order, no cache.

    At most `max_proposals` masks, and at most `limit` when given (the first ones: later ones would go unused).
    """
    small = downscale(image, cfg.max_side)
    return boxes_to_masks(superpixels(small, cfg), selective_search_boxes(small, cfg), cfg.min_inside,
                          limit=_count(cfg, limit))  # fmt: skip


def cache_key(image: np.ndarray, cfg: SelectiveSearchConfig, limit: int | None = None) -> str:
    """SHA-256 hex key of the image content and every option that changes the masks."""
    digest = hashlib.sha256()
    options = {k: v for k, v in asdict(cfg).items() if k != "max_proposals"}  # the count stands for it
    meta = {"format": _CACHE_FORMAT, "opencv": cv2.__version__, "shape": list(image.shape), **options,
            "count": _count(cfg, limit)}  # fmt: skip
    digest.update(json.dumps(meta, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def _read_cache(path: Path, image_shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached low-res masks, or None when the file is missing, unreadable or does not fit this image."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            count, h, w = (int(v) for v in data["shape"])
            packed = data["packed"]
            full = tuple(int(v) for v in data["image_shape"])
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if full != tuple(image_shape) or packed.shape[0] != count:
        return None
    return np.unpackbits(packed, axis=1, count=h * w).reshape(count, h, w).view(bool)


def _write_cache(path: Path, masks: np.ndarray, image_shape: tuple[int, ...]) -> None:
    count, h, w = masks.shape
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(
                f,
                packed=np.packbits(masks.reshape(count, -1), axis=1),
                shape=np.array([count, h, w], dtype=np.int64),
                image_shape=np.array(image_shape, dtype=np.int64),
            )
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def proposal_masks(
    image: np.ndarray,
    cfg: SelectiveSearchConfig | None = None,
    cache_dir: str | Path | None = None,
    limit: int | None = None,
) -> np.ndarray:
    """Segment proposals (P, H, W) bool of an RGB uint8 image (H, W, 3), in rank order; cached in `cache_dir`.

    `limit`: the caller uses only the first `limit` proposals, so no more are built.
    """
    cfg = cfg or SelectiveSearchConfig()
    _check_image(image)
    if cache_dir is None:
        return upsample_masks(low_res_proposals(image, cfg, limit), image.shape[:2])
    folder = Path(cache_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"retrieval.cache_dir={str(cache_dir)!r} cannot be created: {err.strerror or err}") from err
    path = folder / f"{cache_key(image, cfg, limit)}.npz"
    masks = _read_cache(path, image.shape)
    if masks is None:
        masks = low_res_proposals(image, cfg, limit)
        try:
            _write_cache(path, masks, image.shape)
        except OSError as err:
            raise ConfigError(f"retrieval.cache_dir={str(cache_dir)!r} is not writable: {err.strerror or err}") from err
    return upsample_masks(masks, image.shape[:2])
