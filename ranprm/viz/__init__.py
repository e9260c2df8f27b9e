"""Visualisation: pure panel rendering (`panels`); the Lightning callback that logs panels sits on top."""

from ranprm.viz.panels import (
    PanelInputs,
    PanelLayout,
    PanelStyle,
    layout_for,
    panel_caption,
    panel_layout,
    render_panel,
    save_png,
    tile_shape,
)

__all__ = [
    "PanelInputs",
    "PanelLayout",
    "PanelStyle",
    "layout_for",
    "panel_caption",
    "panel_layout",
    "render_panel",
    "save_png",
    "tile_shape",
]
