"""Panels: one picture per image of what the network sees (pure rendering: tensors in, an RGB array out).

A panel is a grid of equal cells, one row per kind of map, top to bottom:

=========  ====================================================================================
overview   the input with ground-truth outlines | the predicted instances (when given)
crm        one cell per valid class: its CRM heat-mapped over the image, its peaks marked
prm        one cell per shown peak (at most `max_prms`): its PRM over the image, the peak marked
attention  one cell per RAN attention module: its soft mask over the image
=========  ====================================================================================

A row with more cells than `PanelStyle.max_cols` wraps onto further rows of the same kind; a kind with nothing
to show has no row, so a panel with no valid class, no instances or no attention is simply smaller.

Each cell is a caption strip (class names, value ranges) above a picture of the *tile size*: the image size by
default, or the image scaled so its longer side is `tile_size`. Every map is resized to the tile, whatever its
own resolution (CRMs at stride 32, attention masks at stride 4 to 16, GT masks at the original image size), so
the caller never resizes anything. Point coordinates (`peaks`) are in the pixels of `image`.

Heat maps use perceptually uniform colour maps (viridis, inferno, magma) read from a 256-entry table built
once; text, outlines and markers are drawn with OpenCV. No pyplot figure is ever made, which keeps a 192 px
panel at a few milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import cv2
import matplotlib
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from torch import Tensor

from ranprm.prm.instances import Instances
from ranprm.utils.io import write_bytes_atomic

RowKind = Literal["overview", "crm", "prm", "attention"]
# A caption, or alternatives from most to least informative: the first that fits the tile is drawn.
Caption = str | tuple[str, ...]

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)


@dataclass
class PanelInputs:
    """Everything drawn for one image; the fields after `peaks` are optional.

    image:         (3, H, W) float in [0, 1], un-normalised RGB (values outside are clipped)
    class_names:   the dataset's class names, indexed by the class ids below
    crms:          (C, h, w) raw class response maps (logits) of this image, any resolution
    valid_classes: (V,) long, the classes whose CRM is shown, in this order
    peaks:         (K, 3) [class, y, x], the valid peaks; y, x in pixels of `image` (float is fine)
    prms:          (K, H', W') the PRM of each row of `peaks`, any resolution; when None, the PRM row shows
                   the instances' own `prms` instead (each instance remembers its seeding peak)
    instances:     the predicted instances; their masks/prms may be at any size, their peaks are in pixels of
                   `instances.image_size`
    gt_masks:      (M, H'', W'') bool ground-truth instance masks, any resolution (e.g. the original size)
    gt_labels:     (M,) long class ids of `gt_masks`
    attention:     one map per attention module, (h_i, w_i) or (C_i, h_i, w_i) (channels averaged), in [0, 1]
    class_scores:  (C,) class logits; when given, CRM captions show the class probability sigmoid(score)
    """

    image: Tensor
    class_names: Sequence[str]
    crms: Tensor
    valid_classes: Tensor
    peaks: Tensor
    prms: Tensor | None = None
    instances: Instances | None = None
    gt_masks: Tensor | None = None
    gt_labels: Tensor | None = None
    attention: Sequence[Tensor] | None = None
    class_scores: Tensor | None = None


@dataclass(frozen=True)
class PanelStyle:
    """How a panel looks. The defaults are tuned for 192 to 448 px tiles."""

    crm_cmap: str = "viridis"
    prm_cmap: str = "inferno"
    attention_cmap: str = "magma"
    # Instances and GT outlines need distinct colours, not an ordered scale: a qualitative map.
    instance_cmap: str = "tab10"
    # A heat map is blended over a grey copy of the image with a per-pixel opacity that grows with the map's
    # value, so the scene stays visible where the response is low and the colour dominates where it is high.
    heat_alpha: tuple[float, float] = (0.3, 0.85)
    instance_alpha: float = 0.45
    max_cols: int = 8
    max_instances: int = 20
    gap: int = 4
    background: tuple[int, int, int] = (28, 28, 28)
    caption_background: tuple[int, int, int] = (48, 48, 48)


@dataclass(frozen=True)
class PanelLayout:
    """Geometry of a panel: which rows, how many columns, and the size of everything in pixels.

    rows:      (kind, number of cells) per row, top to bottom
    cols:      number of columns (the longest row)
    tile_hw:   (h, w) of the picture in a cell
    caption_h: height of the caption strip above each picture
    gap:       space between cells and around the border
    """

    rows: tuple[tuple[RowKind, int], ...]
    cols: int
    tile_hw: tuple[int, int]
    caption_h: int
    gap: int

    @property
    def cell_hw(self) -> tuple[int, int]:
        return self.tile_hw[0] + self.caption_h, self.tile_hw[1]

    @property
    def size(self) -> tuple[int, int]:
        """(H', W') of the panel: `rows * cell_h + (rows + 1) * gap` by `cols * tile_w + (cols + 1) * gap`."""
        cell_h, cell_w = self.cell_hw
        n = len(self.rows)
        return n * cell_h + (n + 1) * self.gap, self.cols * cell_w + (self.cols + 1) * self.gap

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """(y, x) of the top-left corner of a cell (of its caption strip)."""
        cell_h, cell_w = self.cell_hw
        return self.gap + row * (cell_h + self.gap), self.gap + col * (cell_w + self.gap)

    def picture_origin(self, row: int, col: int) -> tuple[int, int]:
        """(y, x) of the top-left corner of a cell's picture, below its caption."""
        y, x = self.origin(row, col)
        return y + self.caption_h, x


def tile_shape(image_hw: tuple[int, int], tile_size: int | None = None) -> tuple[int, int]:
    """(h, w) of a tile's picture: the image size, or the image scaled so its longer side is `tile_size`."""
    h, w = image_hw
    if tile_size is None:
        return h, w
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    scale = tile_size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def font_scale(tile_w: int) -> float:
    """Caption font scale: grows with the tile so text stays legible on large tiles and fits on small ones."""
    return float(np.clip(tile_w / 480.0, 0.35, 0.9))


def caption_height(tile_w: int) -> int:
    """Height of the caption strip for a tile of width `tile_w`: one line of text plus a small margin."""
    (_, text_h), baseline = cv2.getTextSize("Ag", _FONT, font_scale(tile_w), 1)
    return text_h + baseline + 6


def panel_layout(
    image_hw: tuple[int, int],
    num_crms: int,
    num_prms: int,
    has_instances: bool,
    num_attention: int,
    tile_size: int | None = None,
    max_cols: int = 8,
    gap: int = 4,
) -> PanelLayout:
    """The layout of a panel for the given counts of cells (`num_prms` already capped by the caller).

    The overview row is always there (the input, plus the instances when `has_instances`); each other kind
    gets `ceil(n / max_cols)` rows, none when `n == 0`.
    """
    if max_cols < 2:
        raise ValueError(f"max_cols must be at least 2 (the overview row has two cells), got {max_cols}")
    rows: list[tuple[RowKind, int]] = [("overview", 2 if has_instances else 1)]
    kinds: list[tuple[RowKind, int]] = [("crm", num_crms), ("prm", num_prms), ("attention", num_attention)]
    for kind, n in kinds:
        for start in range(0, n, max_cols):
            rows.append((kind, min(max_cols, n - start)))
    tile_hw = tile_shape(image_hw, tile_size)
    cols = max(n for _, n in rows)
    return PanelLayout(tuple(rows), cols, tile_hw, caption_height(tile_hw[1]), gap)


def layout_for(
    inputs: PanelInputs, max_prms: int = 8, tile_size: int | None = None, style: PanelStyle | None = None
) -> PanelLayout:
    """The layout `render_panel` uses for these inputs."""
    style = style or PanelStyle()
    return panel_layout(
        (int(inputs.image.shape[-2]), int(inputs.image.shape[-1])),
        num_crms=len(inputs.valid_classes),
        num_prms=min(max_prms, len(_prm_sources(inputs))),
        has_instances=inputs.instances is not None,
        num_attention=len(inputs.attention or ()),
        tile_size=tile_size,
        max_cols=style.max_cols,
        gap=style.gap,
    )


def render_panel(
    inputs: PanelInputs, max_prms: int = 8, tile_size: int | None = None, style: PanelStyle | None = None
) -> np.ndarray:
    """Render the panel of one image: an (H', W', 3) uint8 RGB array, H', W' = `layout_for(inputs, ...).size`.

    `max_prms` caps the PRM cells so a busy image does not make a giant panel. The peaks shown are taken in
    turn from each class (strongest CRM value first), so every class gets a PRM before any gets a second; a
    "+N" badge on the last PRM says how many were left out.
    """
    style = style or PanelStyle()
    if inputs.image.ndim != 3 or inputs.image.shape[0] != 3:
        raise ValueError(f"panel image must be (3, H, W), got {tuple(inputs.image.shape)}")
    if inputs.crms.ndim != 3:
        raise ValueError(f"panel crms must be (C, h, w), got {tuple(inputs.crms.shape)}")
    if inputs.peaks.numel() and (inputs.peaks.ndim != 2 or inputs.peaks.shape[1] != 3):
        raise ValueError(f"panel peaks must be (K, 3) [class, y, x], got {tuple(inputs.peaks.shape)}")
    bad = [int(c) for c in inputs.valid_classes.reshape(-1).tolist() if not 0 <= int(c) < len(inputs.crms)]
    if bad:
        raise ValueError(f"valid classes {bad} are outside the {len(inputs.crms)} CRMs")
    if max_prms < 0:
        raise ValueError(f"max_prms must be >= 0, got {max_prms}")

    image_hw = (int(inputs.image.shape[1]), int(inputs.image.shape[2]))
    layout = layout_for(inputs, max_prms, tile_size, style)
    th, tw = layout.tile_hw
    # Peaks are given in image pixels; tiles may be scaled.
    sy, sx = th / image_hw[0], tw / image_hw[1]

    rgb = _resize(_to_numpy(inputs.image.clamp(0, 1)).transpose(1, 2, 0), (th, tw))
    rgb = (rgb * 255.0 + 0.5).astype(np.uint8)
    # Heat maps go over a grey, slightly dimmed copy: colour then belongs to the map alone.
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)[..., None] * 0.85

    names = list(inputs.class_names)
    peaks = _to_numpy(inputs.peaks).reshape(-1, 3)
    marker = max(7, min(th, tw) // 16)

    cells: dict[RowKind, list[tuple[np.ndarray, Caption]]] = {
        "overview": [],
        "crm": [],
        "prm": [],
        "attention": [],
    }
    cells["overview"].append((_gt_tile(rgb, inputs, style), _gt_caption(inputs, names)))
    if inputs.instances is not None:
        cells["overview"].append(_instance_tile(rgb, inputs.instances, style, names, marker))

    probs = None if inputs.class_scores is None else torch.sigmoid(inputs.class_scores.detach().float()).cpu()
    crms = _to_numpy(inputs.crms)
    for c in _to_numpy(inputs.valid_classes).astype(int).reshape(-1).tolist():
        # The range comes from the raw map, so the caption shows the network's own logits.
        lo, hi = float(crms[c].min()), float(crms[c].max())
        heat = _normalise(_resize(crms[c], (th, tw)), lo, hi)
        tile = _heat_over(grey, heat, style.crm_cmap, style.heat_alpha)
        mine = peaks[peaks[:, 0].astype(int) == c] if len(peaks) else peaks
        for _, y, x in mine:
            _draw_marker(tile, y * sy, x * sx, marker)
        # Most informative first: a narrow tile drops the range, then the probability, then cuts the name.
        name = f"CRM {_name(names, c)}"
        prob = "" if probs is None else f" p={float(probs[c]):.2f}"
        cells["crm"].append((tile, (f"{name}{prob} [{lo:.1f},{hi:.1f}]", f"{name}{prob}", name)))

    sources = _prm_sources(inputs)
    shown = _pick_prms(sources, crms, image_hw, max_prms)
    for rank, (c, y, x, prm, k, n) in enumerate(shown):
        # PRMs are non-negative by construction: scaled from 0, a weak PRM is not stretched into a strong one.
        heat = _normalise(_resize(prm, (th, tw)), 0.0, float(prm.max()) if prm.size else 0.0)
        tile = _heat_over(grey, heat, style.prm_cmap, style.heat_alpha)
        _draw_marker(tile, y * sy, x * sx, marker)
        if rank == len(shown) - 1 and len(sources) > len(shown):
            _draw_badge(tile, f"+{len(sources) - len(shown)} more")
        cells["prm"].append((tile, f"PRM {_name(names, c)} {k}/{n}"))

    for i, att in enumerate(inputs.attention or ()):
        a = _to_numpy(att)
        while a.ndim > 3 and a.shape[0] == 1:  # tolerate a leading batch dimension of one
            a = a[0]
        if a.ndim == 3:
            a = a.mean(axis=0)
        if a.ndim != 2:
            raise ValueError(f"attention map {i} must be (h, w) or (C, h, w), got {tuple(att.shape)}")
        lo, hi = float(a.min()), float(a.max())
        heat = _normalise(_resize(a, (th, tw)), lo, hi)
        tile = _heat_over(grey, heat, style.attention_cmap, style.heat_alpha)
        cells["attention"].append((tile, f"attention {i + 1} [{lo:.2f},{hi:.2f}]"))

    return _compose(layout, cells, style)


def panel_caption(inputs: PanelInputs, image_id: str | None = None) -> str:
    """A one-line description for a logger's caption: the image, its valid classes, what the panel shows."""
    names = list(inputs.class_names)
    classes = ", ".join(_name(names, int(c)) for c in inputs.valid_classes.reshape(-1).tolist()) or "none"
    parts = [f"valid classes: {classes}", f"{len(inputs.peaks)} peaks"]
    if inputs.instances is not None:
        parts.append(f"{len(inputs.instances)} instances")
    if inputs.gt_labels is not None:
        gt = ", ".join(_name(names, int(c)) for c in inputs.gt_labels.reshape(-1).tolist()) or "none"
        parts.append(f"GT: {gt}")
    text = "; ".join(parts)
    return f"{image_id}: {text}" if image_id else text


def save_png(path: str | os.PathLike[str], panel: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB panel as a PNG, atomically: a reader never sees a half-written file.

    The bytes go to a temporary file in the same folder, which then replaces `path` (a rename within one file
    system is atomic). Missing parent folders are created.
    """
    if panel.dtype != np.uint8 or panel.ndim != 3 or panel.shape[2] != 3:
        raise ValueError(f"panel must be (H, W, 3) uint8, got {panel.shape} {panel.dtype}")
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(panel[..., ::-1]))  # OpenCV writes BGR
    if not ok:
        raise OSError(f"could not encode a PNG for {path}")
    write_bytes_atomic(path, encoded.tobytes())


# ------------------------------------------------------------------------------------------------ internals


def _to_numpy(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _name(names: list[str], c: int) -> str:
    return names[c] if 0 <= c < len(names) else f"class {c}"


def _resize(arr: np.ndarray, hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize an (h, w) or (h, w, 3) array to `hw`.

    Bilinear with half-pixel centres, the convention of `ranprm.prm.peaks.to_image_coordinates`: a peak mapped
    to image pixels lands on the centre of its blob in the resized CRM.
    """
    if arr.shape[:2] == hw:
        return np.ascontiguousarray(arr)
    mode = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(arr), (hw[1], hw[0]), interpolation=mode)


def _normalise(m: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Scale a map from [lo, hi] to [0, 1] (float32); a flat or non-finite range gives zeros.

    Per-map scaling shows the shape of each response; the range printed in the caption keeps its strength.
    """
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo <= 1e-12:
        return np.zeros(m.shape, np.float32)
    return np.clip((m - lo) * (1.0 / (hi - lo)), 0.0, 1.0).astype(np.float32)


@lru_cache(maxsize=16)
def _lut(name: str) -> np.ndarray:
    """(256, 3) float32 RGB table of a matplotlib colour map, built once per map."""
    cmap = matplotlib.colormaps[name]
    return (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.float32)


@lru_cache(maxsize=16)
def _palette(name: str) -> tuple[tuple[int, int, int], ...]:
    """The distinct colours of a qualitative matplotlib map, as RGB int triples."""
    cmap = matplotlib.colormaps[name]
    if isinstance(cmap, ListedColormap) and cmap.N <= 32:
        colours = [cmap(i) for i in range(cmap.N)]  # an int indexes a listed map's entries directly
    else:  # a continuous map: ten evenly spaced samples
        colours = [cmap(v) for v in np.linspace(0.0, 1.0, 10)]
    return tuple((round(r * 255), round(g * 255), round(b * 255)) for r, g, b, _ in colours)


def _heat_over(grey: np.ndarray, heat: np.ndarray, cmap: str, alpha: tuple[float, float]) -> np.ndarray:
    """Blend a [0, 1] map (h, w), coloured by `cmap`, over the grey image (h, w, 1) float: (h, w, 3) uint8."""
    coloured = _lut(cmap)[(heat * 255.0 + 0.5).astype(np.uint8)]
    a = (alpha[0] + (alpha[1] - alpha[0]) * heat)[..., None]
    return (grey * (1.0 - a) + coloured * a + 0.5).astype(np.uint8)


def _draw_marker(tile: np.ndarray, y: float, x: float, size: int) -> None:
    """A white cross with a black outline: visible on any colour map."""
    if not (np.isfinite(y) and np.isfinite(x)):
        return
    p = (round(float(x)), round(float(y)))
    cv2.drawMarker(tile, p, _BLACK, cv2.MARKER_CROSS, size + 2, 4, cv2.LINE_AA)
    cv2.drawMarker(tile, p, _WHITE, cv2.MARKER_CROSS, size, 2, cv2.LINE_AA)


def _draw_text_box(tile: np.ndarray, text: str, x: int, y: int, colour: tuple[int, int, int], scale: float) -> None:
    """Text on a filled box whose top-left corner is near (x, y), kept inside the tile."""
    (w, h), base = cv2.getTextSize(text, _FONT, scale, 1)
    x = int(np.clip(x, 0, max(0, tile.shape[1] - w - 4)))
    y = int(np.clip(y, 0, max(0, tile.shape[0] - h - base - 4)))
    cv2.rectangle(tile, (x, y), (x + w + 3, y + h + base + 3), colour, -1)
    # Dark text on light boxes, light text on dark ones.
    ink = _BLACK if sum(c * k for c, k in zip(colour, (0.299, 0.587, 0.114), strict=True)) > 140 else _WHITE
    cv2.putText(tile, text, (x + 2, y + h + 1), _FONT, scale, ink, 1, cv2.LINE_AA)


def _draw_badge(tile: np.ndarray, text: str) -> None:
    scale = font_scale(tile.shape[1])
    (w, h), base = cv2.getTextSize(text, _FONT, scale, 1)
    _draw_text_box(tile, text, tile.shape[1] - w - 6, tile.shape[0] - h - base - 6, (235, 235, 235), scale)


def _masks_at(masks: Tensor, hw: tuple[int, int]) -> np.ndarray:
    """(N, H, W) masks of any size to (N, h, w) uint8 at the tile size (nearest: outlines stay sharp)."""
    m = masks.detach().to("cpu").numpy().astype(np.uint8)
    return np.stack([_resize(x, hw, nearest=True) for x in m]) if len(m) else np.zeros((0, *hw), np.uint8)


def _outline(tile: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], thickness: int) -> None:
    # RETR_LIST keeps the holes' borders too: a ring-shaped object shows both edges.
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(tile, contours, -1, colour, thickness, cv2.LINE_AA)


def _line_width(hw: tuple[int, int]) -> int:
    return max(1, round(min(hw) / 128))


def _gt_tile(rgb: np.ndarray, inputs: PanelInputs, style: PanelStyle) -> np.ndarray:
    """The input with each GT instance outlined in its own colour (no fill: the image stays readable)."""
    tile = rgb.copy()
    if inputs.gt_masks is None or len(inputs.gt_masks) == 0:
        return tile
    palette = _palette(style.instance_cmap)
    width = _line_width(tile.shape[:2])
    for i, mask in enumerate(_masks_at(inputs.gt_masks, tile.shape[:2])):
        _outline(tile, mask, palette[i % len(palette)], width)
    return tile


def _gt_caption(inputs: PanelInputs, names: list[str]) -> str:
    if inputs.gt_masks is None:
        return "input"
    labels = [] if inputs.gt_labels is None else inputs.gt_labels.reshape(-1).tolist()
    if not len(inputs.gt_masks):
        return "input, GT: none"
    # Names once each, with a count when a class has several instances: "GT 2 person, dog".
    counts: dict[int, int] = {}
    for c in labels:
        counts[int(c)] = counts.get(int(c), 0) + 1
    text = ", ".join(f"{n} {_name(names, c)}" if n > 1 else _name(names, c) for c, n in counts.items())
    return f"GT {text}" if text else f"GT {len(inputs.gt_masks)} instances"


def _instance_tile(
    rgb: np.ndarray, instances: Instances, style: PanelStyle, names: list[str], marker: int
) -> tuple[np.ndarray, str]:
    """Predicted instances filled and outlined in distinct colours, each labelled `class score`."""
    tile = rgb.copy()
    n = len(instances)
    if n == 0:
        return tile, "pred: none"
    hw = tile.shape[:2]
    order = torch.argsort(instances.scores.detach().float().cpu(), descending=True)[: style.max_instances]
    shown = instances[order.to(instances.labels.device)]
    masks = _masks_at(shown.masks, hw)
    palette = _palette(style.instance_cmap)
    colours = [palette[i % len(palette)] for i in range(len(shown))]
    # Lowest score first, so the most confident instance is drawn on top.
    blend = tile.astype(np.float32)
    for i in reversed(range(len(shown))):
        m = masks[i].astype(bool)
        blend[m] = blend[m] * (1.0 - style.instance_alpha) + np.array(colours[i], np.float32) * style.instance_alpha
    tile = (blend + 0.5).astype(np.uint8)
    width = _line_width(hw)
    ih, iw = instances.image_size
    sy, sx = hw[0] / ih, hw[1] / iw
    scale = font_scale(hw[1]) * 0.9
    labels = shown.labels.cpu().tolist()
    scores = shown.scores.detach().float().cpu().tolist()
    peaks = _to_numpy(shown.peaks).reshape(-1, 2)
    for i in reversed(range(len(shown))):
        _outline(tile, masks[i], colours[i], width)
        y, x = peaks[i]
        if np.isfinite(y) and np.isfinite(x):
            cv2.drawMarker(tile, (round(x * sx), round(y * sy)), colours[i], cv2.MARKER_TILTED_CROSS, marker, 2)
    for i in reversed(range(len(shown))):
        ys, xs = np.nonzero(masks[i])
        # The label sits at the mask box's top-left corner, or at the peak when the mask vanished in resizing.
        top, left = (int(ys.min()), int(xs.min())) if len(ys) else (int(peaks[i][0] * sy), int(peaks[i][1] * sx))
        _draw_text_box(tile, f"{_name(names, labels[i])} {scores[i]:.2f}", left, top, colours[i], scale)
    caption = f"pred {n}" + (f" (top {len(shown)})" if len(shown) < n else "")
    return tile, caption


def _prm_sources(inputs: PanelInputs) -> list[tuple[int, float, float, np.ndarray | Tensor]]:
    """(class, y, x in image pixels, prm) for every PRM the inputs carry: explicit `prms`, else instances'."""
    if inputs.prms is not None:
        if len(inputs.prms) != len(inputs.peaks):
            raise ValueError(f"panel prms has {len(inputs.prms)} maps but peaks has {len(inputs.peaks)} rows")
        peaks = _to_numpy(inputs.peaks).reshape(-1, 3)
        return [(int(c), float(y), float(x), inputs.prms[i]) for i, (c, y, x) in enumerate(peaks)]
    inst = inputs.instances
    if inst is None or len(inst) == 0:
        return []
    # Instance peaks are in pixels of the instances' image size; bring them to the panel image's pixels.
    ih, iw = inst.image_size
    h, w = int(inputs.image.shape[1]), int(inputs.image.shape[2])
    peaks = _to_numpy(inst.peaks).reshape(-1, 2)
    labels = inst.labels.cpu().tolist()
    return [(int(labels[i]), float(y) * h / ih, float(x) * w / iw, inst.prms[i]) for i, (y, x) in enumerate(peaks)]


def _pick_prms(
    sources: list[tuple[int, float, float, np.ndarray | Tensor]],
    crms: np.ndarray,
    image_hw: tuple[int, int],
    max_prms: int,
) -> list[tuple[int, float, float, np.ndarray, int, int]]:
    """Choose at most `max_prms` PRMs: round-robin over classes, each class's peaks strongest first.

    Returns (class, y, x, prm as float array, rank within its class from 1, peaks of that class).
    """
    if not sources or max_prms == 0:
        return []
    c_n, h, w = crms.shape
    by_class: dict[int, list[tuple[float, int]]] = {}
    for i, (c, y, x, _) in enumerate(sources):
        # Strength = the CRM cell under the peak; an unknown class or a point off the map ranks last.
        u = int(np.clip(np.floor(y * h / image_hw[0]), 0, h - 1))
        v = int(np.clip(np.floor(x * w / image_hw[1]), 0, w - 1))
        strength = float(crms[c, u, v]) if 0 <= c < c_n and np.isfinite(y) and np.isfinite(x) else -np.inf
        by_class.setdefault(c, []).append((strength, i))
    queues = {c: sorted(v, key=lambda t: -t[0]) for c, v in by_class.items()}
    # Classes in order of their best peak, so the strongest class leads the row.
    class_order = sorted(queues, key=lambda c: -queues[c][0][0])
    picked: list[tuple[int, float, float, np.ndarray, int, int]] = []
    depth = 0
    while len(picked) < max_prms and any(len(queues[c]) > depth for c in class_order):
        for c in class_order:
            if depth < len(queues[c]) and len(picked) < max_prms:
                c_, y, x, prm = sources[queues[c][depth][1]]
                arr = _to_numpy(prm) if isinstance(prm, Tensor) else np.asarray(prm, np.float32)
                picked.append((c_, y, x, arr, depth + 1, len(queues[c])))
        depth += 1
    return picked


def _fit_text(options: Caption, width: int, scale: float) -> str:
    """The first of `options` that fits in `width` pixels, else the last one shortened with '..'.

    Hershey fonts are ASCII only, so anything else becomes '?'.
    """
    options = (options,) if isinstance(options, str) else options
    for text in options:
        text = text.encode("ascii", "replace").decode("ascii")
        if cv2.getTextSize(text, _FONT, scale, 1)[0][0] <= width:
            return text
    while len(text) > 1 and cv2.getTextSize(text + "..", _FONT, scale, 1)[0][0] > width:
        text = text[:-1]
    return text + ".."


def _filled(shape: tuple[int, int, int], colour: tuple[int, int, int]) -> np.ndarray:
    """A uint8 array of one colour; numpy broadcasts a 3-vector slowly (3-byte inner loop), so copy a row."""
    out = np.empty(shape, np.uint8)
    out[:] = np.tile(np.asarray(colour, np.uint8), (shape[1], 1))
    return out


def _compose(
    layout: PanelLayout, cells: dict[RowKind, list[tuple[np.ndarray, Caption]]], style: PanelStyle
) -> np.ndarray:
    """Paste tiles and captions into the panel, row by row, following `layout`."""
    panel = _filled((*layout.size, 3), style.background)
    th, tw = layout.tile_hw
    scale = font_scale(tw)
    (_, text_h), _ = cv2.getTextSize("Ag", _FONT, scale, 1)
    taken: dict[RowKind, int] = {k: 0 for k in cells}
    for r, (kind, count) in enumerate(layout.rows):
        for col in range(count):
            tile, caption = cells[kind][taken[kind]]
            taken[kind] += 1
            y, x = layout.origin(r, col)
            strip = _filled((layout.caption_h, tw, 3), style.caption_background)
            cv2.putText(
                strip,
                _fit_text(caption, tw - 6, scale),
                (3, 3 + text_h),
                _FONT,
                scale,
                _WHITE,
                1,
                cv2.LINE_AA,
            )
            panel[y : y + layout.caption_h, x : x + tw] = strip
            py, px = layout.picture_origin(r, col)
            panel[py : py + th, px : px + tw] = tile
    return panel
