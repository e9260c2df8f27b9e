"""Visualisation, pure rendering (arrays in, an RGB array out): `draw` (the drawing kit every picture uses),
`layout` (a panel's grid), `panels` (CRM/PRM panels), `overlay` (the predict overlay). The Lightning callback
that logs panels is `ranprm.lightning.panels`."""

from ranprm.viz.draw import save_png
from ranprm.viz.layout import PanelLayout, panel_layout, tile_shape
from ranprm.viz.overlay import render_overlay
from ranprm.viz.panels import PanelInputs, PanelStyle, choose_prms, layout_for, panel_caption, render_panel

__all__ = [
    "PanelInputs",
    "PanelLayout",
    "PanelStyle",
    "choose_prms",
    "layout_for",
    "panel_caption",
    "panel_layout",
    "render_overlay",
    "render_panel",
    "save_png",
    "tile_shape",
]
