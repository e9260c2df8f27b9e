"""Panels: one picture per image of what the network sees (pure rendering: tensors in, an RGB array out).

A panel is a grid of equal cells (`ranprm.viz.layout`), one row per kind of map, top to bottom:

=========  ====================================================================================
overview   the input with ground-truth outlines | the predicted instances (when given)
crm        one cell per valid class, in `valid_classes` order: its CRM over the image, its peaks marked
prm        one cell per shown peak (at most `max_prms`): the PRM of that peak over the image, the peak marked
attention  one cell per RAN attention module: its soft mask over the image
=========  ====================================================================================

A row with more cells than `PanelStyle.max_cols` wraps onto further rows of the same kind; a kind with nothing
to show has no row, so a panel with no valid class, no PRMs, no instances or no attention is simply smaller.

The PRM row follows the CRM row: its classes come in the CRM row's order, each class's peaks strongest first,
taken in turn so every class gets a PRM before any gets a second. Each PRM tile shows the map of the very peak it
marks, from `PanelInputs.prms`. The instances' own `prms` are not shown there: after NMS an instance's map is
merged with the maps of the instances it suppressed (`ranprm.prm.retrieval`), whatever their class, so it can
be brightest under another class's peak.

What a reader needs to match things at a glance:
- every class has one colour (`draw.class_colour`) in every tile: GT outlines (labelled with the class), predicted
  instances, the swatch before each CRM and PRM caption and the peak numbers; a legend of the classes present
  runs along the bottom of the panel;
- the peaks are numbered in the CRM tiles, and each PRM tile is titled with its peak's number, class and CRM value
  at the peak (the number is also drawn beside its cross);
- every heat map has a colour bar at its right edge; the PRMs share one scale by default (`prm_scale="shared"`:
  a weak map looks weak, and the bar's white tick marks each map's own maximum) or are each scaled to their own
  maximum (`"per_map"`), and the caption gives each PRM's maximum;
- labels are drawn last, on opaque boxes, moved off markers and other labels (`draw.place_label`);
- instances scored below `display_score` are not drawn, and the prediction caption and the legend say how many
  were left out.

Each cell is a caption strip (class names, value ranges) above a picture of the *tile size*: the image size by
default, or the image scaled so its longer side is `tile_size`. Every map is resized to the tile, whatever its
own resolution (CRMs at stride 32, PRMs at the network input or the image size, attention masks at stride 4 to
16, GT masks at the original image size), so the caller never resizes anything. Point coordinates (`peaks`,
`instances.peaks`) are in the pixels of `image` and of `instances.image_size`; both are scaled to the tile.
Drawing is `ranprm.viz.draw`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ranprm.prm.instances import Instances
from ranprm.viz import draw
from ranprm.viz.layout import (
    Cell,
    PanelLayout,
    RowKind,
    compose,
    font_scale,
    panel_layout,
    tile_shape,
    with_legend,
)

# How PRM tiles are scaled: `shared` (one scale for the panel's PRMs: a weak map looks weak) | `per_map` (each to its
# own maximum: the shape of a weak map shows).
PRM_SCALES = ("shared", "per_map")


@dataclass
class PanelInputs:
    """Everything drawn for one image; the fields after `peaks` are optional.

    image:         the picture: (3, H, W) float in [0, 1] (values outside are clipped), or (H, W, 3) uint8 RGB
                   as read from disk (the original pixels the dataset's samples carry as `raw_image`)
    class_names:   the dataset's class names, indexed by the class ids below
    crms:          (C, h, w) raw class response maps (logits) of this image, any resolution
    valid_classes: (V,) long, the classes whose CRM is shown, in this order
    peaks:         (K, 3) [class, y, x], the valid peaks; y, x in pixels of `image` (float is fine)
    prms:          (K, H', W') the PRM of each row of `peaks`, any resolution; None: no PRM row
    instances:     the predicted instances; their masks may be at any size, their peaks are in pixels of
                   `instances.image_size`
    gt_masks:      (M, H'', W'') bool ground-truth instance masks, any resolution (e.g. the original size)
    gt_labels:     (M,) long class ids of `gt_masks`
    attention:     one map per attention module, (h_i, w_i) or (C_i, h_i, w_i) (channels averaged), in [0, 1]
    class_scores:  (C,) class logits; when given, CRM captions show the class probability sigmoid(score)
    """

    image: Tensor | np.ndarray
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

    @property
    def image_hw(self) -> tuple[int, int]:
        """(H, W) of `image`, whichever of its two forms it has; a bad shape raises ValueError."""
        shape = tuple(self.image.shape)
        if _is_uint8(self.image) and len(shape) == 3 and shape[2] == 3:
            return int(shape[0]), int(shape[1])
        if not _is_uint8(self.image) and len(shape) == 3 and shape[0] == 3:
            return int(shape[1]), int(shape[2])
        raise ValueError(f"panel image must be (3, H, W) float or (H, W, 3) uint8, got {shape} {self.image.dtype}")


@dataclass(frozen=True)
class PanelStyle:
    """How a panel looks. The defaults are tuned for 192 to 448 px tiles."""

    crm_cmap: str = "viridis"
    prm_cmap: str = "inferno"
    attention_cmap: str = "magma"
    # The class colours: a qualitative map (greys left out), class c's colour a function of c alone.
    class_cmap: str = draw.CLASS_PALETTE
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
class PrmChoice:
    """One PRM tile: row `index` of the peaks, its class and position (image pixels), its rank in its class, and
    the class's CRM value at the peak (-inf: unknown class or a point off the map)."""

    index: int
    label: int
    y: float
    x: float
    rank: int  # 1 for the class's strongest peak
    of: int  # peaks of that class
    value: float = float("-inf")


def choose_prms(
    peaks: np.ndarray, crms: np.ndarray, image_hw: tuple[int, int], class_order: Sequence[int], max_prms: int
) -> list[PrmChoice]:
    """At most `max_prms` peaks for the PRM row, in the CRM row's class order.

    peaks (K, 3) [class, y, x] in image pixels; crms (C, h, w). Classes come in `class_order` (the CRM row's),
    then any other class of `peaks` by id; each class's peaks strongest first (the CRM cell under the peak; an
    unknown class or a point off the map ranks last); classes taken in turn, so every class gets a PRM before
    any gets a second.
    """
    if len(peaks) == 0 or max_prms == 0:
        return []
    c_n, h, w = crms.shape
    by_class: dict[int, list[tuple[float, int]]] = {}
    strengths: dict[int, float] = {}
    for i, (c, y, x) in enumerate(peaks):
        c = int(c)
        if 0 <= c < c_n and np.isfinite(y) and np.isfinite(x):
            # Pixel y's centre lies in CRM cell floor((y + 0.5) * h / H) (`to_image_coordinates`' convention).
            u = int(np.clip(np.floor((y + 0.5) * h / image_hw[0]), 0, h - 1))
            v = int(np.clip(np.floor((x + 0.5) * w / image_hw[1]), 0, w - 1))
            strength = float(crms[c, u, v])
        else:
            strength = -np.inf
        strengths[i] = strength
        by_class.setdefault(c, []).append((-strength if np.isfinite(strength) else np.inf, i))
    first = [c for c in dict.fromkeys(int(c) for c in class_order) if c in by_class]
    order = first + sorted(set(by_class) - set(first))
    queues = {c: [i for _, i in sorted(by_class[c])] for c in order}  # stable: ties keep the peaks' order
    picked: list[PrmChoice] = []
    depth = 0
    while len(picked) < max_prms and any(len(queues[c]) > depth for c in order):
        for c in order:
            if depth < len(queues[c]) and len(picked) < max_prms:
                i = queues[c][depth]
                picked.append(
                    PrmChoice(i, c, float(peaks[i, 1]), float(peaks[i, 2]), depth + 1, len(queues[c]), strengths[i])
                )
        depth += 1
    return picked


@dataclass(frozen=True)
class _Plan:
    """What a panel shows, decided before anything is drawn (`layout_for` and `render_panel` share it)."""

    layout: PanelLayout
    legend: list[list[draw.LegendItem]]
    numbered: list[PrmChoice]  # every peak, numbered 1.. in this order (the PRM row's order)
    shown_prms: list[PrmChoice]  # the PRM row: the first `max_prms` of `numbered` (none without PRMs)
    prm_max: list[float]  # each shown PRM's maximum
    prm_scale_max: float  # the shared scale's top: the largest of `prm_max`
    instance_order: list[int]  # the instances drawn, highest score first
    hidden_instances: int  # instances below the display score


def _plan(
    inputs: PanelInputs,
    max_prms: int,
    tile_size: int | None,
    style: PanelStyle,
    display_score: float,
    prm_scale: str,
) -> _Plan:
    if prm_scale not in PRM_SCALES:
        raise ValueError(f"prm_scale={prm_scale!r}: choose one of {PRM_SCALES}")
    names = list(inputs.class_names)
    peaks = draw.to_numpy(inputs.peaks).reshape(-1, 3)
    crms = draw.to_numpy(inputs.crms)
    valid = draw.to_numpy(inputs.valid_classes).astype(int).reshape(-1).tolist()
    numbered = choose_prms(peaks, crms, inputs.image_hw, valid, len(peaks))
    shown = numbered[:max_prms] if inputs.prms is not None else []
    prm_max = []
    for choice in shown:
        prm = draw.to_numpy(inputs.prms[choice.index])  # type: ignore[index]
        top = float(np.nanmax(prm)) if prm.size and np.isfinite(prm).any() else 0.0
        prm_max.append(top if np.isfinite(top) else 0.0)
    order: list[int] = []
    hidden = 0
    if inputs.instances is not None and len(inputs.instances):
        scores = inputs.instances.scores.detach().float().cpu()
        ranked = torch.argsort(scores, descending=True).tolist()
        kept = [i for i in ranked if float(scores[i]) >= display_score]
        hidden = len(ranked) - len(kept)
        order = kept[: style.max_instances]
    layout = panel_layout(
        inputs.image_hw,
        num_crms=len(valid),
        num_prms=len(shown),
        has_instances=inputs.instances is not None,
        num_attention=len(inputs.attention or ()),
        tile_size=tile_size,
        max_cols=style.max_cols,
        gap=style.gap,
    )
    gt = [] if inputs.gt_labels is None or inputs.gt_masks is None else inputs.gt_labels.reshape(-1).tolist()
    predicted = [] if inputs.instances is None else inputs.instances.labels.cpu()[order].tolist()
    classes = dict.fromkeys(int(c) for c in [*gt, *valid, *predicted, *(p.label for p in shown)])
    items: list[draw.LegendItem] = [(_name(names, c), draw.class_colour(c, style.class_cmap)) for c in classes]
    scale_max = max(prm_max, default=0.0)
    if shown:
        items.append(
            (f"PRMs on one scale, 0 to {scale_max:.3g}", None) if prm_scale == "shared"
            else ("PRMs each scaled to its own max", None)
        )  # fmt: skip
    if hidden:
        items.append((f"{hidden} instance{'s' if hidden > 1 else ''} below {display_score:.2f} not drawn", None))
    layout, lines = with_legend(layout, items)
    return _Plan(layout, lines, numbered, shown, prm_max, scale_max, order, hidden)


def layout_for(
    inputs: PanelInputs,
    max_prms: int = 8,
    tile_size: int | None = None,
    style: PanelStyle | None = None,
    *,
    display_score: float = draw.DISPLAY_SCORE,
    prm_scale: str = "shared",
) -> PanelLayout:
    """The layout `render_panel` uses for these inputs (the same arguments)."""
    return _plan(inputs, max_prms, tile_size, style or PanelStyle(), display_score, prm_scale).layout


def render_panel(
    inputs: PanelInputs,
    max_prms: int = 8,
    tile_size: int | None = None,
    style: PanelStyle | None = None,
    *,
    display_score: float = draw.DISPLAY_SCORE,
    prm_scale: str = "shared",
) -> np.ndarray:
    """Render the panel of one image: an (H', W', 3) uint8 RGB array, H', W' = `layout_for(inputs, ...).size`.

    `max_prms` caps the PRM cells so a busy image does not make a giant panel; a "+N more" badge on the last
    PRM says how many peaks were left out. Instances scored below `display_score` are left out of the prediction
    tile (the caption and the legend count them). `prm_scale`: `shared` | `per_map` (`PRM_SCALES`).
    """
    style = style or PanelStyle()
    _check(inputs, max_prms)
    plan = _plan(inputs, max_prms, tile_size, style, display_score, prm_scale)
    image_hw = inputs.image_hw
    layout = plan.layout
    th, tw = layout.tile_hw
    sy, sx = th / image_hw[0], tw / image_hw[1]  # image pixels -> tile pixels
    scale = font_scale(tw)
    bar_w = max(4, tw // 40)

    rgb = draw.resize(_rgb_uint8(inputs.image), (th, tw))
    # Heat maps go over a grey, slightly dimmed copy: colour then belongs to the map alone.
    grey = draw.grey_of(rgb, dim=0.85)
    names = list(inputs.class_names)
    crms = draw.to_numpy(inputs.crms)
    valid = draw.to_numpy(inputs.valid_classes).astype(int).reshape(-1).tolist()
    marker = max(7, min(th, tw) // 16)
    number = {choice.index: n + 1 for n, choice in enumerate(plan.numbered)}

    def colour(c: int) -> draw.RGB:
        return draw.class_colour(c, style.class_cmap)

    cells: dict[RowKind, list[Cell]] = {"overview": [], "crm": [], "prm": [], "attention": []}
    cells["overview"].append((_gt_tile(rgb, inputs, style, names), _gt_caption(inputs, names), None))
    if inputs.instances is not None:
        cells["overview"].append(_instance_tile(rgb, inputs.instances, style, names, marker, plan, display_score))

    probs = None if inputs.class_scores is None else torch.sigmoid(inputs.class_scores.detach().float()).cpu()
    for c in valid:
        # The range comes from the raw map, so the caption shows the network's own logits.
        lo, hi = float(crms[c].min()), float(crms[c].max())
        tile = draw.heat_over(grey, draw.normalise(draw.resize(crms[c], (th, tw)), lo, hi), style.crm_cmap,
                              style.heat_alpha)  # fmt: skip
        draw.draw_colour_bar(tile, style.crm_cmap, bar_w)
        _numbered_peaks(tile, [p for p in plan.numbered if p.label == c], number, (sy, sx), marker, scale, colour(c))
        # Most informative first: a narrow tile drops the range, then the probability, then cuts the name.
        name = f"CRM {_name(names, c)}"
        prob = "" if probs is None else f" p={float(probs[c]):.2f}"
        cells["crm"].append((tile, (f"{name}{prob} [{lo:.1f},{hi:.1f}]", f"{name}{prob}", name), colour(c)))

    for n, (choice, top) in enumerate(zip(plan.shown_prms, plan.prm_max, strict=True)):
        prm = draw.to_numpy(inputs.prms[choice.index])  # type: ignore[index]
        # PRMs are non-negative by construction: scaled from 0, a weak PRM is not stretched into a strong one.
        hi = plan.prm_scale_max if prm_scale == "shared" else top
        tile = draw.heat_over(grey, draw.normalise(draw.resize(prm, (th, tw)), 0.0, hi), style.prm_cmap,
                              style.heat_alpha)  # fmt: skip
        level = top / hi if prm_scale == "shared" and hi > 0 else None
        draw.draw_colour_bar(tile, style.prm_cmap, bar_w, level)
        marks = _numbered_peaks(tile, [choice], number, (sy, sx), marker, scale, colour(choice.label))
        left = len(plan.numbered) - len(plan.shown_prms)
        if n == len(plan.shown_prms) - 1 and left > 0:
            text = f"+{left} more"
            box = draw.place_label((th, tw), draw.label_size(text, scale), [(0, th)], marks)
            draw.draw_label(tile, text, box, (235, 235, 235), scale)
        k, name = number[choice.index], _name(names, choice.label)
        value = f"{choice.value:.1f}" if np.isfinite(choice.value) else "?"
        captions = (f"#{k} {name} peak {value} max {top:.2g}", f"#{k} {name} {value} max {top:.2g}",
                    f"#{k} {name} {value}", f"#{k} {name}")  # fmt: skip
        cells["prm"].append((tile, captions, colour(choice.label)))

    for i, att in enumerate(inputs.attention or ()):
        a = draw.to_numpy(att)
        while a.ndim > 3 and a.shape[0] == 1:  # tolerate a leading batch dimension of one
            a = a[0]
        if a.ndim == 3:
            a = a.mean(axis=0)
        if a.ndim != 2:
            raise ValueError(f"attention map {i} must be (h, w) or (C, h, w), got {tuple(att.shape)}")
        lo, hi = float(a.min()), float(a.max())
        tile = draw.heat_over(grey, draw.normalise(draw.resize(a, (th, tw)), lo, hi), style.attention_cmap,
                              style.heat_alpha)  # fmt: skip
        draw.draw_colour_bar(tile, style.attention_cmap, bar_w)
        cells["attention"].append((tile, f"attention {i + 1} [{lo:.2f},{hi:.2f}]", None))

    return compose(layout, cells, style.background, style.caption_background, plan.legend)


def largest_layout(
    image_hws: Sequence[tuple[int, int]],
    class_names: Sequence[str],
    num_attention: int,
    max_prms: int = 8,
    tile_size: int | None = None,
    style: PanelStyle | None = None,
) -> PanelLayout:
    """The largest panel a run's images should give: every image's tile, a row of CRMs as long as the classes
    allow (up to `max_cols`), `max_prms` PRMs, the attention maps, and a legend naming every class. Loggers pad
    each panel to it (`layout.pad_to`), so one run's panels share one size (a busier panel is padded to itself).
    """
    style = style or PanelStyle()
    tiles = [tile_shape(hw, tile_size) for hw in image_hws] or [(1, 1)]
    layout = panel_layout(
        (max(h for h, _ in tiles), max(w for _, w in tiles)),
        num_crms=min(len(class_names), style.max_cols),
        num_prms=max_prms,
        has_instances=True,
        num_attention=num_attention,
        tile_size=None,
        max_cols=style.max_cols,
        gap=style.gap,
    )
    colours = [(name, draw.class_colour(c, style.class_cmap)) for c, name in enumerate(class_names)]
    notes: list[draw.LegendItem] = [
        ("PRMs on one scale, 0 to 0.000e-00", None),
        ("00 instances below 0.00 not drawn", None),
    ]
    return with_legend(layout, [*colours, *notes])[0]


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


# ------------------------------------------------------------------------------------------------ internals


def _is_uint8(image: Tensor | np.ndarray) -> bool:
    return image.dtype == torch.uint8 if isinstance(image, Tensor) else np.asarray(image).dtype == np.uint8


def _rgb_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    """The panel's picture as (H, W, 3) uint8, from either form `PanelInputs.image` takes."""
    if _is_uint8(image):
        return np.ascontiguousarray(image.numpy() if isinstance(image, Tensor) else image)
    chw = draw.to_numpy(image.clamp(0, 1) if isinstance(image, Tensor) else np.clip(image, 0, 1))
    return (chw.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)


def _check(inputs: PanelInputs, max_prms: int) -> None:
    inputs.image_hw  # noqa: B018 (raises on a bad shape)
    if inputs.crms.ndim != 3:
        raise ValueError(f"panel crms must be (C, h, w), got {tuple(inputs.crms.shape)}")
    if inputs.peaks.numel() and (inputs.peaks.ndim != 2 or inputs.peaks.shape[1] != 3):
        raise ValueError(f"panel peaks must be (K, 3) [class, y, x], got {tuple(inputs.peaks.shape)}")
    if inputs.prms is not None and len(inputs.prms) != len(inputs.peaks):
        raise ValueError(f"panel prms has {len(inputs.prms)} maps but peaks has {len(inputs.peaks)} rows")
    bad = [int(c) for c in inputs.valid_classes.reshape(-1).tolist() if not 0 <= int(c) < len(inputs.crms)]
    if bad:
        raise ValueError(f"valid classes {bad} are outside the {len(inputs.crms)} CRMs")
    if max_prms < 0:
        raise ValueError(f"max_prms must be >= 0, got {max_prms}")


def _name(names: list[str], c: int) -> str:
    return names[c] if 0 <= c < len(names) else f"class {c}"


def _numbered_peaks(
    tile: np.ndarray,
    choices: Sequence[PrmChoice],
    number: dict[int, int],
    to_tile: tuple[float, float],
    marker: int,
    scale: float,
    colour: draw.RGB,
) -> list[draw.Rect]:
    """Each peak's cross, then its number on a box of its class's colour beside it; returns the boxes covered."""
    sy, sx = to_tile
    marks: list[draw.Rect] = []
    for p in choices:
        draw.draw_peak(tile, p.y * sy, p.x * sx, marker)
        box = draw.marker_box(p.y * sy, p.x * sx, marker)
        marks += [box] if box is not None else []
    for p in choices:
        text = str(number[p.index])
        size = draw.label_size(text, scale)
        # Touching the cross's top-right corner first, then any free spot around it.
        cross = draw.marker_box(p.y * sy, p.x * sx, marker)
        anchors = [(float(cross[2]), float(cross[1] - size[1]))] if cross is not None else []
        box = draw.place_label(tile.shape[:2], size, [*anchors, (p.x * sx, p.y * sy)], marks)
        draw.draw_label(tile, text, box, colour, scale)
        marks.append(box)
    return marks


def _gt_tile(rgb: np.ndarray, inputs: PanelInputs, style: PanelStyle, names: list[str]) -> np.ndarray:
    """The input with each GT instance outlined in its class's colour and labelled with the class's name (no fill:
    the image stays readable)."""
    if inputs.gt_masks is None or len(inputs.gt_masks) == 0:
        return rgb.copy()
    masks = draw.masks_at(inputs.gt_masks, rgb.shape[:2])
    labels = [] if inputs.gt_labels is None else [int(c) for c in inputs.gt_labels.reshape(-1).tolist()]
    labels += [-1] * (len(masks) - len(labels))  # unlabelled masks: outlined, named by index
    colours = [draw.class_colour(c, style.class_cmap) if c >= 0 else draw.WHITE for c in labels]
    texts = [_name(names, c) if c >= 0 else f"GT {i}" for i, c in enumerate(labels)]
    return draw.draw_instances(
        rgb,
        masks,
        np.full((len(masks), 2), np.nan, np.float32),
        texts,
        alpha=0.0,
        marker=0,
        font_scale=font_scale(rgb.shape[1]) * 0.9,
        colours=colours,
    )


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
    rgb: np.ndarray,
    instances: Instances,
    style: PanelStyle,
    names: list[str],
    marker: int,
    plan: _Plan,
    display_score: float,
) -> Cell:
    """The predicted instances above the display score, filled and outlined in their classes' colours, each
    labelled `class score`; the caption counts those left out."""
    n = len(instances)
    if n == 0:
        return rgb.copy(), "pred: none", None
    hw = rgb.shape[:2]
    shown = instances[torch.tensor(plan.instance_order, dtype=torch.long, device=instances.labels.device)]
    ih, iw = instances.image_size
    seeds = draw.to_numpy(shown.peaks).reshape(-1, 2) * np.array([hw[0] / ih, hw[1] / iw], np.float32)
    scores = shown.scores.detach().float().cpu().tolist()
    classes = shown.labels.cpu().tolist()
    labels = [f"{_name(names, c)} {s:.2f}" for c, s in zip(classes, scores, strict=True)]
    tile = draw.draw_instances(
        rgb,
        draw.masks_at(shown.masks, hw),
        seeds,
        labels,
        alpha=style.instance_alpha,
        marker=marker,
        font_scale=font_scale(hw[1]) * 0.9,
        colours=[draw.class_colour(c, style.class_cmap) for c in classes],
    )
    if plan.hidden_instances:
        hidden, count = plan.hidden_instances, f"pred {len(shown)} of {n}"
        return tile, (f"{count} ({hidden} < {display_score:.2f} hidden)", count), None
    if len(shown) < n:
        return tile, f"pred {n} (top {len(shown)})", None
    return tile, f"pred {n}", None
