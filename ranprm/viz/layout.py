"""The geometry of a panel: rows of equal cells (a caption strip above a picture), and pasting cells into it.

Pure arithmetic plus one paste: what goes into each cell is `ranprm.viz.panels`' business.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ranprm.viz.draw import RGB, WHITE, filled, fit_text, put_text, text_size

RowKind = Literal["overview", "crm", "prm", "attention"]
ROW_KINDS: tuple[RowKind, ...] = ("overview", "crm", "prm", "attention")
# A caption, or alternatives from most to least informative: the first that fits the tile is drawn.
Caption = str | tuple[str, ...]
Cell = tuple[np.ndarray, Caption]


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
) -> np.ndarray:
    """Paste each kind's cells (picture at the tile size, caption) into the panel, following `layout`."""
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
        for (row, col), (tile, caption) in zip(layout.cells_of(kind), cells.get(kind, ()), strict=True):
            y, x = layout.origin(row, col)
            panel[y : y + layout.caption_h, x : x + tw] = strip
            put_text(panel[y : y + layout.caption_h, x : x + tw], fit_text(caption, tw - 6, scale), 3, 3 + text_h,
                     scale, WHITE)  # fmt: skip
            py, px = layout.picture_origin(row, col)
            panel[py : py + th, px : px + tw] = tile
    return panel
