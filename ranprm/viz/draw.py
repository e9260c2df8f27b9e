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
# The qualitative map of the classes: class c has colour `class_colour(c)` in every picture (GT, predictions, the
# CRM and PRM captions, the predict overlay). tab20 has 18 hues without its greys (grey vanishes on the greyed
# photos under the heat maps), so the darkest shade of each of tab20b's five hues follows: 23 distinct colours, one
# for each of VOC's 20 classes; COCO's 80 cycle through them (the labels name the class).
CLASS_PALETTE = "tab20"
EXTRA_CLASS_COLOURS: tuple[RGB, ...] = ((57, 59, 121), (99, 121, 57), (140, 109, 49), (132, 60, 57), (123, 65, 115))
# Instances scored below this are not drawn in the panels and overlays (predictions.json keeps every instance): an
# untrained or briefly trained trunk gives many 0.00-0.05 instances that hide the few that matter.
DISPLAY_SCORE = 0.1
Rect = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 and y1 exclusive


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
def palette(name: str = CLASS_PALETTE) -> tuple[RGB, ...]:
    """The distinct colours of a qualitative matplotlib map as RGB triples, greys left out.

    A grey class does not stand out on a photo (tab10's seventh colour, tab20's 15th and 16th), so achromatic
    entries are dropped. tab20 lists each hue dark then light; its dark hues come first here, so the first classes
    get the most distinct colours. A continuous map gives ten evenly spaced samples.
    """
    cmap = matplotlib.colormaps[name]
    if isinstance(cmap, ListedColormap) and cmap.N <= 32:
        order = list(range(cmap.N))
        if name == "tab20":
            order = order[0::2] + order[1::2]
        samples = [cmap(i) for i in order]  # an int indexes a listed map's entries directly
    else:
        samples = [cmap(v) for v in np.linspace(0.0, 1.0, 10)]
    colours = [(round(r * 255), round(g * 255), round(b * 255)) for r, g, b, _ in samples]
    chromatic = [c for c in colours if max(c) - min(c) > 8]
    return tuple(chromatic or colours)


def class_colour(c: int, name: str = CLASS_PALETTE) -> RGB:
    """The colour of class `c` in every picture: a function of the class index alone."""
    colours = palette(name) + (EXTRA_CLASS_COLOURS if name == CLASS_PALETTE else ())
    return colours[int(c) % len(colours)]


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


def label_size(text: str, scale: float) -> tuple[int, int]:
    """(width, height) of the box `draw_label` draws for one line of text at `scale`."""
    w, h, base = text_size(ascii_text(text), scale)
    return w + 4, h + base + 4


def draw_label(img: np.ndarray, text: str, box: Rect, colour: RGB, scale: float) -> None:
    """Text on an opaque box of `colour` (ink chosen for contrast), the box `box` from `place_label`."""
    x0, y0, x1, y1 = box
    cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), colour, -1)
    _, h, _ = text_size(ascii_text(text), scale)
    put_text(img, text, x0 + 2, y0 + h + 1, scale, ink_for(colour))


def draw_text_box(img: np.ndarray, text: str, x: int, y: int, colour: RGB, scale: float) -> None:
    """Text on a filled box of `colour` whose top-left corner is near (x, y), kept inside the image."""
    w, h = label_size(text, scale)
    x = int(np.clip(x, 0, max(0, img.shape[1] - w)))
    y = int(np.clip(y, 0, max(0, img.shape[0] - h)))
    draw_label(img, text, (x, y, x + w, y + h), colour, scale)


def draw_badge(img: np.ndarray, text: str, scale: float) -> None:
    """A light text box in the bottom-right corner (e.g. "+3 more")."""
    w, h = label_size(text, scale)
    draw_text_box(img, text, img.shape[1] - w - 2, img.shape[0] - h - 2, (235, 235, 235), scale)


# ------------------------------------------------------------------------------------------------ placement


def overlap_area(a: Rect, b: Rect) -> int:
    """Pixels two boxes share (0 when they only touch)."""
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def marker_box(y: float, x: float, size: int, thickness: int = 2) -> Rect | None:
    """The pixels a marker of `size` at (y, x) covers (its border and anti-aliasing included); None: not drawn."""
    if not (np.isfinite(y) and np.isfinite(x)):
        return None
    r = (size + 2) // 2 + thickness
    cx, cy = round(float(x)), round(float(y))
    return cx - r, cy - r, cx + r + 1, cy + r + 1


def place_label(
    hw: tuple[int, int], size: tuple[int, int], anchors: Sequence[tuple[float, float]], occupied: Sequence[Rect]
) -> Rect:
    """Where a label box of `size` (w, h) goes: the first free spot near its anchors, inside an image of `hw`.

    A greedy search: for each anchor (x, y) in turn, the box with its top-left corner at the anchor, then moved
    away in 8 directions in steps of the box's height, until it overlaps nothing in `occupied` (markers and the
    labels placed before). When no spot in the image is free, the spot that covers the least is taken. Callers
    add the result to `occupied`, so later labels avoid it.
    """
    h, w = hw
    bw, bh = size
    step = bh + 1
    directions = ((0, 0), (0, -1), (1, 0), (0, 1), (-1, 0), (1, -1), (1, 1), (-1, 1), (-1, -1))
    best: tuple[int, Rect] | None = None
    seen: set[tuple[int, int]] = set()
    for ax, ay in anchors:
        if not (np.isfinite(ax) and np.isfinite(ay)):
            continue
        for ring in range(0, max(h, w) // step + 2):
            for dx, dy in directions[: 1 if ring == 0 else None]:
                x = int(np.clip(round(ax) + dx * ring * max(step, bw // 2), 0, max(0, w - bw)))
                y = int(np.clip(round(ay) + dy * ring * step, 0, max(0, h - bh)))
                if (x, y) in seen:
                    continue
                seen.add((x, y))
                box = (x, y, x + bw, y + bh)
                cost = sum(overlap_area(box, other) for other in occupied)
                if cost == 0:
                    return box
                if best is None or cost < best[0]:
                    best = (cost, box)
    return best[1] if best is not None else (0, 0, bw, bh)


# ------------------------------------------------------------------------------------------------ legends and bars

LegendItem = tuple[str, RGB | None]  # a text, and the colour of its swatch (None: text alone)


def _item_width(item: LegendItem, scale: float) -> int:
    text, colour = item
    w, h, _ = text_size(ascii_text(text), scale)
    return w + (h + 4 if colour is not None else 0) + 10


def legend_lines(items: Sequence[LegendItem], width: int, scale: float) -> list[list[LegendItem]]:
    """`items` wrapped into lines of at most `width` px (an item wider than a line gets a line of its own)."""
    lines: list[list[LegendItem]] = []
    used = width + 1
    for item in items:
        iw = _item_width(item, scale)
        if used + iw > width and (not lines or lines[-1]):
            lines.append([])
            used = 0
        lines[-1].append(item)
        used += iw
    return lines


def legend_line_height(scale: float) -> int:
    _, h, base = text_size("Ag", scale)
    return h + base + 6


def legend_size(lines: Sequence[Sequence[LegendItem]], scale: float) -> tuple[int, int]:
    """(width, height) of `lines` as `draw_legend` draws them."""
    if not lines:
        return 0, 0
    width = max(sum(_item_width(item, scale) for item in line) for line in lines)
    return width, len(lines) * legend_line_height(scale)


def draw_legend(
    img: np.ndarray, lines: Sequence[Sequence[LegendItem]], x: int, y: int, scale: float, ink: RGB = WHITE
) -> None:
    """Each item of `lines` as a square of its colour then its text, line by line from (x, y) (top-left)."""
    line_h = legend_line_height(scale)
    for row, line in enumerate(lines):
        cx = x + 4
        _, text_h, _ = text_size("Ag", scale)
        base_y = y + row * line_h + 3 + text_h
        for text, colour in line:
            if colour is not None:
                cv2.rectangle(img, (cx, base_y - text_h), (cx + text_h, base_y), colour, -1)
                cv2.rectangle(img, (cx, base_y - text_h), (cx + text_h, base_y), ink, 1)
                cx += text_h + 4
            put_text(img, text, cx, base_y, scale, ink)
            cx += _item_width((text, None), scale)


def draw_colour_bar(tile: np.ndarray, cmap: str, width: int, level: float | None = None) -> None:
    """A vertical bar of `cmap` (its low end at the bottom) along the right edge of `tile`, in place.

    `level` in [0, 1] marks a map's own maximum on a scale it shares with others: a white tick across the bar,
    and the bar dimmed above it, so a weak map shows a short bar.
    """
    h = tile.shape[0]
    if h < 4 or width < 1:
        return
    column = colour_table(cmap)[np.linspace(255, 0, h).round().astype(int)]  # top row: the map's high end
    bar = np.repeat(column[:, None, :], width, axis=1)
    if level is not None and np.isfinite(level):
        top = int(round((1.0 - float(np.clip(level, 0.0, 1.0))) * (h - 1)))
        bar[:top] *= 0.25
        bar[max(0, top - 1) : top + 1] = 255.0
    tile[:, -width:] = (bar + 0.5).astype(np.uint8)
    tile[:, -width - 1] = 0  # a dark edge between the map and its bar


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
    peaks_yx: np.ndarray | None = None,
    occupied: list[Rect] | None = None,
) -> np.ndarray:
    """Instances over `img` (h, w, 3) uint8: filled, outlined, their seeding peaks marked, then each labelled.

    masks:    (N, h, w) uint8 at the image's size, highest score first (the first ends on top)
    seeds_yx: (N, 2) float, each instance's seeding peak in the image's pixels (NaN: none)
    labels:   N texts, e.g. "dog 0.87", each on a box of its instance's colour, near its mask's top-left corner
              (near the seed when the mask is empty), moved to a free spot when a marker or another label is there
    colours:  one per instance (the class colours); default: the palette in turn
    thickness: of outlines and seed crosses; default `line_width` of the image
    peaks_yx: (K, 2) further peaks to mark with a white cross (e.g. every valid peak)
    occupied: boxes the labels must avoid (a legend); the labels' own boxes are appended to it
    alpha 0 outlines without filling (the GT). Labels are drawn last, so nothing covers them.
    Returns a new array; `img` is left as it was.
    """
    n = len(masks)
    if colours is None:
        pal = palette()
        colours = [pal[i % len(pal)] for i in range(n)]
    out = fill_masks(img, masks, colours, alpha) if alpha > 0 else img.copy()
    width = line_width(img.shape[:2]) if thickness is None else thickness
    marks = occupied if occupied is not None else []
    for i in reversed(range(n)):
        outline(out, masks[i], colours[i], width)
        draw_seed(out, seeds_yx[i][0], seeds_yx[i][1], colours[i], marker, max(2, width))
        box = marker_box(seeds_yx[i][0], seeds_yx[i][1], marker, max(2, width))
        marks += [box] if box is not None else []
    for y, x in [] if peaks_yx is None else np.asarray(peaks_yx).reshape(-1, 2):
        draw_peak(out, y, x, marker, width)
        box = marker_box(y, x, marker, width)
        marks += [box] if box is not None else []
    for i in range(n):  # the most confident instance picks its spot first
        ys, xs = np.nonzero(masks[i])
        sy, sx = seeds_yx[i]
        anchors = [(float(xs.min()), float(ys.min()))] if len(ys) else []
        seed = marker_box(sy, sx, marker, max(2, width))
        anchors += [(float(seed[2]), float(seed[1] - label_size(labels[i], font_scale)[1]))] if seed else []
        box = place_label(out.shape[:2], label_size(labels[i], font_scale), anchors or [(0.0, 0.0)], marks)
        draw_label(out, labels[i], box, colours[i], font_scale)
        marks.append(box)
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
