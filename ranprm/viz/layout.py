"""The geometry of a panel: rows of equal cells (a caption strip above a picture), and pasting cells into it.

Pure arithmetic plus one paste: what goes into each cell is `ranprm.viz.panels`' business.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ranprm.viz.draw import (
    RGB,
    WHITE,
    LegendItem,
    draw_legend,
    filled,
    fit_text,
    legend_line_height,
    legend_lines,
    put_text,
    text_size,
)

RowKind = Literal["overview", "crm", "prm", "attention"]
ROW_KINDS: tuple[RowKind, ...] = ("overview", "crm", "prm", "attention")
# A caption, or alternatives from most to least informative: the first that fits the tile is drawn.
Caption = str | tuple[str, ...]
# A cell: its picture, its caption, and the class colour of the swatch that starts the caption (None: no swatch).
Cell = tuple[np.ndarray, Caption, RGB | None]


@dataclass(frozen=True)
class PanelLayout:
    """Geometry of a panel: which rows, how many columns, and the size of everything in pixels.

    rows:      (kind, number of cells) per row, top to bottom
    cols:      number of columns (the longest row)
    tile_hw:   (h, w) of the picture in a cell
    caption_h: height of the caption strip above each picture
    gap:       space between cells and around the border
    footer_h:  height of the legend strip below the last row (0: none)
    """

    rows: tuple[tuple[RowKind, int], ...]
    cols: int
    tile_hw: tuple[int, int]
    caption_h: int
    gap: int
    footer_h: int = 0

    @property
    def cell_hw(self) -> tuple[int, int]:
        return self.tile_hw[0] + self.caption_h, self.tile_hw[1]

    @property
    def size(self) -> tuple[int, int]:
        """(H', W') of the panel: `rows * cell_h + (rows + 1) * gap` (plus the footer and a gap below it) by
        `cols * tile_w + (cols + 1) * gap`."""
        cell_h, cell_w = self.cell_hw
        n = len(self.rows)
        footer = self.footer_h + self.gap if self.footer_h else 0
        return n * cell_h + (n + 1) * self.gap + footer, self.cols * cell_w + (self.cols + 1) * self.gap

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """(y, x) of the top-left corner of a cell (of its caption strip)."""
        cell_h, cell_w = self.cell_hw
        return self.gap + row * (cell_h + self.gap), self.gap + col * (cell_w + self.gap)

    def picture_origin(self, row: int, col: int) -> tuple[int, int]:
        """(y, x) of the top-left corner of a cell's picture, below its caption."""
        y, x = self.origin(row, col)
        return y + self.caption_h, x

    def cells_of(self, kind: RowKind) -> list[tuple[int, int]]:
        """(row, col) of every cell of `kind`, in reading order (the order its cells were given in)."""
        return [(r, c) for r, (k, n) in enumerate(self.rows) if k == kind for c in range(n)]


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
    _, text_h, baseline = text_size("Ag", font_scale(tile_w))
    return text_h + baseline + 6


def with_legend(layout: PanelLayout, items: Sequence[LegendItem]) -> tuple[PanelLayout, list[list[LegendItem]]]:
    """`layout` with a footer tall enough for `items` wrapped to the panel's width, and the wrapped lines."""
    scale = font_scale(layout.tile_hw[1])
    lines = legend_lines(items, layout.size[1] - 2 * layout.gap, scale)
    footer_h = len(lines) * legend_line_height(scale) if lines else 0
    return PanelLayout(layout.rows, layout.cols, layout.tile_hw, layout.caption_h, layout.gap, footer_h), lines


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


def compose(
    layout: PanelLayout,
    cells: Mapping[RowKind, Sequence[Cell]],
    background: RGB,
    caption_background: RGB,
    legend: Sequence[Sequence[LegendItem]] = (),
) -> np.ndarray:
    """Paste each kind's cells (picture at the tile size, caption) into the panel, following `layout`, and the
    `legend` lines (`with_legend`) into its footer."""
    for kind in ROW_KINDS:
        wanted, given = len(layout.cells_of(kind)), len(cells.get(kind, ()))
        if wanted != given:
            raise ValueError(f"the layout has {wanted} {kind} cells, {given} were drawn")
    panel = filled((*layout.size, 3), background)
    th, tw = layout.tile_hw
    scale = font_scale(tw)
    _, text_h, _ = text_size("Ag", scale)
    strip = filled((layout.caption_h, tw, 3), caption_background)
    for kind in ROW_KINDS:
        for (row, col), (tile, caption, swatch) in zip(layout.cells_of(kind), cells.get(kind, ()), strict=True):
            y, x = layout.origin(row, col)
            panel[y : y + layout.caption_h, x : x + tw] = strip
            text_x = 3
            if swatch is not None:  # the class's colour, as its masks and labels have it
                panel[y + 3 : y + 3 + text_h + 1, x + 3 : x + 3 + text_h] = swatch
                text_x += text_h + 4
            put_text(panel[y : y + layout.caption_h, x : x + tw], fit_text(caption, tw - 3 - text_x, scale), text_x,
                     3 + text_h, scale, WHITE)  # fmt: skip
            py, px = layout.picture_origin(row, col)
            panel[py : py + th, px : px + tw] = tile
    if layout.footer_h and legend:
        n = len(layout.rows)
        top = n * (layout.cell_hw[0] + layout.gap) + layout.gap
        draw_legend(panel, legend, layout.gap, top, scale, WHITE)
    return panel


def pad_to(panel: np.ndarray, hw: tuple[int, int], background: RGB) -> np.ndarray:
    """`panel` on a canvas of `hw` (its top-left corner at the canvas's), the rest `background`: loggers show the
    panels of a run at one size. A panel larger than `hw` is refused (ValueError), never cut."""
    h, w = panel.shape[:2]
    if h > hw[0] or w > hw[1]:
        raise ValueError(f"a {h} x {w} panel does not fit a {hw[0]} x {hw[1]} canvas")
    if (h, w) == tuple(hw):
        return panel
    canvas = filled((hw[0], hw[1], 3), background)
    canvas[:h, :w] = panel
    return canvas
