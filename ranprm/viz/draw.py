"""The drawing kit of `ranprm.viz`: every primitive the panels and the predict overlay draw with, in one place.

Arrays are RGB uint8 (H, W, 3), drawn on in place with OpenCV (no pyplot figure is ever made: a 192 px panel
stays at about ten milliseconds). Points are (y, x) in the pixels of the array drawn on; a caller whose points
are in another image's pixels scales them first. Colour maps and palettes are matplotlib's, read once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

import cv2
import matplotlib
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from torch import Tensor

from ranprm.utils.io import write_bytes_atomic

RGB = tuple[int, int, int]

FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)
# The qualitative map for instances and GT outlines: distinct colours matter, not an order.
INSTANCE_PALETTE = "tab10"


# ------------------------------------------------------------------------------------------------ arrays


def to_numpy(t: Tensor | np.ndarray) -> np.ndarray:
    """A tensor or array as a float32 NumPy array on the CPU (bf16 and half included)."""
    if isinstance(t, Tensor):
        return t.detach().to("cpu", torch.float32).numpy()
    return np.asarray(t, np.float32)


def filled(shape: tuple[int, int, int], colour: RGB) -> np.ndarray:
    """A uint8 array of one colour; numpy broadcasts a 3-vector slowly (3-byte inner loop), so copy a row."""
    out = np.empty(shape, np.uint8)
    out[:] = np.tile(np.asarray(colour, np.uint8), (shape[1], 1))
    return out


def resize(arr: np.ndarray, hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize an (h, w) or (h, w, 3) array to `hw`.

    Bilinear with half-pixel centres, the convention of `ranprm.prm.peaks.to_image_coordinates`: a peak mapped
    to image pixels lands on the centre of its blob in the resized CRM. `nearest` keeps masks sharp.
    """
    if arr.shape[:2] == hw:
        return np.ascontiguousarray(arr)
    mode = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(arr), (hw[1], hw[0]), interpolation=mode)


def masks_at(masks: Tensor | np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(N, H, W) masks of any size to (N, h, w) uint8 at `hw` (nearest: outlines stay sharp)."""
    m = masks.detach().to("cpu").numpy() if isinstance(masks, Tensor) else np.asarray(masks)
    m = m.astype(np.uint8)
    return np.stack([resize(x, hw, nearest=True) for x in m]) if len(m) else np.zeros((0, *hw), np.uint8)


# ------------------------------------------------------------------------------------------------ colour


@lru_cache(maxsize=16)
def palette(name: str = INSTANCE_PALETTE) -> tuple[RGB, ...]:
    """The distinct colours of a qualitative matplotlib map as RGB triples, greys left out.

    A grey instance does not stand out on a photo (tab10's seventh colour), so achromatic entries are dropped.
    A continuous map gives ten evenly spaced samples.
    """
    cmap = matplotlib.colormaps[name]
    if isinstance(cmap, ListedColormap) and cmap.N <= 32:
        samples = [cmap(i) for i in range(cmap.N)]  # an int indexes a listed map's entries directly
    else:
        samples = [cmap(v) for v in np.linspace(0.0, 1.0, 10)]
    colours = [(round(r * 255), round(g * 255), round(b * 255)) for r, g, b, _ in samples]
    chromatic = [c for c in colours if max(c) - min(c) > 8]
    return tuple(chromatic or colours)


def ink_for(background: RGB) -> RGB:
    """Black text on a light background, white on a dark one (by the background's luma)."""
    return BLACK if 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2] > 140 else WHITE


@lru_cache(maxsize=16)
def colour_table(cmap: str) -> np.ndarray:
    """(256, 3) float32 RGB table of a matplotlib colour map, built once per map."""
    return (matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.float32)


def normalise(m: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Scale a map from [lo, hi] to [0, 1] (float32); a flat or non-finite range gives zeros."""
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo <= 1e-12:
        return np.zeros(m.shape, np.float32)
    return np.clip((m - lo) * (1.0 / (hi - lo)), 0.0, 1.0).astype(np.float32)


def grey_of(rgb: np.ndarray, dim: float = 1.0) -> np.ndarray:
    """(h, w) uint8 luminance of an RGB uint8 image, scaled by `dim`: the backdrop of a heat map."""
    luma = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return luma if dim == 1.0 else cv2.convertScaleAbs(luma, alpha=dim)


@lru_cache(maxsize=16)
def _blend_table(cmap: str, alpha: tuple[float, float]) -> np.ndarray:
    """(256 * 256, 3) uint8: `heat_over`'s result for every (grey level, heat level) pair, built once.

    One table look-up per pixel replaces the per-pixel float blend (about 6x faster on a 192 px tile).
    """
    grey = np.arange(256, dtype=np.float32)[:, None, None]
    level = np.arange(256)
    a = (alpha[0] + (alpha[1] - alpha[0]) * level / 255.0).astype(np.float32)[None, :, None]
    return (grey * (1.0 - a) + colour_table(cmap)[level][None] * a + 0.5).astype(np.uint8).reshape(256 * 256, 3)


def heat_over(grey: np.ndarray, heat: np.ndarray, cmap: str, alpha: tuple[float, float]) -> np.ndarray:
    """A [0, 1] map (h, w), coloured by `cmap`, blended over `grey` (h, w) uint8: (h, w, 3) uint8.

    The opacity grows from `alpha[0]` to `alpha[1]` with the map's value, so the scene stays visible where the
    response is low and the colour dominates where it is high. The map is read in 256 levels, as the colour
    map is.
    """
    index = (grey.astype(np.uint16) << 8) | (heat * 255.0 + 0.5).astype(np.uint8)
    return np.take(_blend_table(cmap, (float(alpha[0]), float(alpha[1]))), index, axis=0)


def fill_masks(img: np.ndarray, masks: np.ndarray, colours: Sequence[RGB], alpha: float) -> np.ndarray:
    """`img` with each mask (N, h, w) filled in its colour at `alpha`; the first mask ends on top.

    Callers pass instances highest score first, so the most confident one is the most visible.
    """
    out = img.astype(np.float32)
    for i in reversed(range(len(masks))):
        m = masks[i].astype(bool)
        out[m] = out[m] * (1.0 - alpha) + np.asarray(colours[i], np.float32) * alpha
    return (out + 0.5).clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ marks


def line_width(hw: tuple[int, int]) -> int:
    """Outline thickness for an image of `hw`: thin on tiles, thicker on large photos."""
    return max(1, round(min(hw) / 128))


def outline(img: np.ndarray, mask: np.ndarray, colour: RGB, thickness: int) -> None:
    """Draw the boundary of a uint8 mask; RETR_LIST keeps the holes' borders, so a ring shows both edges."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, colour, thickness, cv2.LINE_AA)


def draw_peak(img: np.ndarray, y: float, x: float, size: int, thickness: int = 2) -> None:
    """A white cross with a black border at a peak: visible on any colour map. Non-finite points are skipped."""
    if not (np.isfinite(y) and np.isfinite(x)):
        return
    p = (round(float(x)), round(float(y)))
    cv2.drawMarker(img, p, BLACK, cv2.MARKER_CROSS, size + 2, thickness + 2, cv2.LINE_AA)
    cv2.drawMarker(img, p, WHITE, cv2.MARKER_CROSS, size, thickness, cv2.LINE_AA)


def draw_seed(img: np.ndarray, y: float, x: float, colour: RGB, size: int, thickness: int = 2) -> None:
    """A tilted cross in an instance's colour at the peak that seeded it. Non-finite points are skipped."""
    if np.isfinite(y) and np.isfinite(x):
        cv2.drawMarker(img, (round(float(x)), round(float(y))), colour, cv2.MARKER_TILTED_CROSS, size, thickness)


# ------------------------------------------------------------------------------------------------ text


def ascii_text(text: str) -> str:
    """Hershey fonts draw ASCII only: anything else becomes '?'."""
    return text.encode("ascii", "replace").decode("ascii")


def text_size(text: str, scale: float) -> tuple[int, int, int]:
    """(width, height, baseline) of one line of text at `scale`."""
    (w, h), base = cv2.getTextSize(text, FONT, scale, 1)
    return w, h, base


def fit_text(options: str | Sequence[str], width: int, scale: float) -> str:
    """The first of `options` (most to least informative) that fits in `width` px, else the last cut with '..'."""
    options = (options,) if isinstance(options, str) else tuple(options)
    text = ""
    for text in map(ascii_text, options):
        if text_size(text, scale)[0] <= width:
            return text
    while len(text) > 1 and text_size(text + "..", scale)[0] > width:
        text = text[:-1]
    return text + ".."


def put_text(img: np.ndarray, text: str, x: int, baseline_y: int, scale: float, colour: RGB = WHITE) -> None:
    """One line of anti-aliased text whose baseline starts at (x, baseline_y)."""
    cv2.putText(img, ascii_text(text), (x, baseline_y), FONT, scale, colour, 1, cv2.LINE_AA)


def draw_text_box(img: np.ndarray, text: str, x: int, y: int, colour: RGB, scale: float) -> None:
    """Text on a filled box of `colour` whose top-left corner is near (x, y), kept inside the image."""
    text = ascii_text(text)
    w, h, base = text_size(text, scale)
    x = int(np.clip(x, 0, max(0, img.shape[1] - w - 4)))
    y = int(np.clip(y, 0, max(0, img.shape[0] - h - base - 4)))
    cv2.rectangle(img, (x, y), (x + w + 3, y + h + base + 3), colour, -1)
    put_text(img, text, x + 2, y + h + 1, scale, ink_for(colour))


def draw_badge(img: np.ndarray, text: str, scale: float) -> None:
    """A light text box in the bottom-right corner (e.g. "+3 more")."""
    w, h, base = text_size(ascii_text(text), scale)
    draw_text_box(img, text, img.shape[1] - w - 6, img.shape[0] - h - base - 6, (235, 235, 235), scale)


# ------------------------------------------------------------------------------------------------ instances


def draw_instances(
    img: np.ndarray,
    masks: np.ndarray,
    seeds_yx: np.ndarray,
    labels: Sequence[str],
    *,
    alpha: float,
    marker: int,
    font_scale: float,
    colours: Sequence[RGB] | None = None,
    thickness: int | None = None,
) -> np.ndarray:
    """Instances over `img` (h, w, 3) uint8: filled, outlined, their seeding peaks marked, each labelled.

    masks:    (N, h, w) uint8 at the image's size, highest score first (the first ends on top)
    seeds_yx: (N, 2) float, each instance's seeding peak in the image's pixels (NaN: none)
    labels:   N texts, e.g. "dog 0.87", drawn at the top-left corner of each mask's box (at the seed when
              the mask is empty)
    colours:  one per instance; default: the instance palette in turn
    thickness: of outlines and seed crosses; default `line_width` of the image
    Returns a new array; `img` is left as it was.
    """
    n = len(masks)
    if colours is None:
        pal = palette()
        colours = [pal[i % len(pal)] for i in range(n)]
    out = fill_masks(img, masks, colours, alpha)
    width = line_width(img.shape[:2]) if thickness is None else thickness
    for i in reversed(range(n)):
        outline(out, masks[i], colours[i], width)
        draw_seed(out, seeds_yx[i][0], seeds_yx[i][1], colours[i], marker, max(2, width))
    for i in reversed(range(n)):
        ys, xs = np.nonzero(masks[i])
        if len(ys):
            top, left = int(ys.min()), int(xs.min())
        else:
            y, x = seeds_yx[i]
            top, left = (int(y), int(x)) if np.isfinite(y) and np.isfinite(x) else (0, 0)
        draw_text_box(out, labels[i], left, top, colours[i], font_scale)
    return out


# ------------------------------------------------------------------------------------------------ files


def save_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image as a PNG, atomically: a reader never sees a half-written file.

    The bytes go to a temporary file in the same folder, which then replaces `path` (a rename within one file
    system is atomic). Missing parent folders are created.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"a PNG image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))  # OpenCV writes BGR
    if not ok:
        raise OSError(f"could not encode a PNG for {path}")
    write_bytes_atomic(path, encoded.tobytes())
