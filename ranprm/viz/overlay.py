"""The `ranprm-predict` overlay: one image with its instances filled and outlined, peaks marked, names and scores.

Pure rendering: an RGB uint8 array and `Instances` in, an RGB uint8 array out. It draws with the same kit
(`ranprm.viz.draw`) and the same instance drawing as the panels' prediction tile, sized for a full photo: one colour
per class (`draw.class_colour`), a legend of the classes drawn, labels last and off the markers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ranprm.prm.instances import Instances
from ranprm.viz import draw


def render_overlay(
    image: np.ndarray,
    instances: Instances,
    class_names: Sequence[str],
    peaks: Tensor | np.ndarray | None = None,
    alpha: float = 0.45,
    display_score: float = draw.DISPLAY_SCORE,
) -> np.ndarray:
    """Instances over `image` (H, W, 3) uint8 RGB; masks must be at the image's size.

    Each instance scored at least `display_score` (highest score on top) is filled with its class's colour at
    `alpha`, outlined, its seeding peak marked with a tilted cross in that colour, and labelled "<class> <score>"
    near its mask's top-left corner (near the peak when the mask is empty), on a box moved off every marker and
    every other label. A legend in the emptiest corner names the classes drawn and says how many instances were
    below the display score. `peaks` (K, 3) [class, y, x] in image pixels are further peaks to mark with a white
    cross (e.g. every valid peak).
    """
    img = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    h, w = img.shape[:2]
    masks = instances.masks.detach().cpu().numpy().astype(np.uint8)
    if len(masks) and masks.shape[1:] != (h, w):
        raise ValueError(f"render_overlay: masks are {masks.shape[1:]}, the image is {(h, w)}")
    scores = instances.scores.detach().float().cpu()
    order = [i for i in torch.argsort(scores, descending=True).tolist() if float(scores[i]) >= display_score]
    hidden = len(scores) - len(order)
    masks = masks[order] if len(masks) else masks
    labels = [int(c) for c in instances.labels.cpu()[order].tolist()]
    names = [class_names[c] if 0 <= c < len(class_names) else str(c) for c in labels]
    colours = [draw.class_colour(c) for c in labels]
    # Sized for a whole photo: thinner lines and smaller text than a panel tile of the same width.
    marker = max(5, round(min(h, w) / 40))
    thickness = max(1, round(min(h, w) / 200))
    scale = float(np.clip(min(h, w) / 700, 0.3, 1.0))

    items: list[draw.LegendItem] = [(name, colour) for name, colour in dict(zip(names, colours, strict=True)).items()]
    if hidden:
        items.append((f"{hidden} below {display_score:.2f} not drawn", None))
    lines = draw.legend_lines(items, max(80, w // 2), scale)
    legend_w, legend_h = draw.legend_size(lines, scale)
    legend_box = _emptiest_corner((h, w), (legend_w + 4, legend_h), masks)
    occupied = [legend_box] if lines else []

    out = draw.draw_instances(
        img,
        masks,
        draw.to_numpy(instances.peaks).reshape(-1, 2)[order],
        [f"{name} {float(scores[i]):.2f}" for name, i in zip(names, order, strict=True)],
        alpha=alpha,
        marker=marker,
        font_scale=scale,
        colours=colours,
        thickness=thickness,
        peaks_yx=None if peaks is None else draw.to_numpy(peaks).reshape(-1, 3)[:, 1:],
        occupied=occupied,
    )
    if lines:  # drawn last, on a dark box: nothing covers it
        x0, y0, x1, y1 = legend_box
        out[y0:y1, x0:x1] = (out[y0:y1, x0:x1] * 0.3).astype(np.uint8)
        draw.draw_legend(out, lines, x0, y0, scale, draw.WHITE)
    return out


def _emptiest_corner(hw: tuple[int, int], size: tuple[int, int], masks: np.ndarray) -> draw.Rect:
    """The box of `size` (w, h) in the image corner the masks cover least (top-left first on a tie)."""
    h, w = hw
    bw, bh = min(size[0], w), min(size[1], h)
    corners = [(0, 0), (w - bw, 0), (0, h - bh), (w - bw, h - bh)]
    covered = masks.any(axis=0) if len(masks) else np.zeros(hw, bool)
    x, y = min(corners, key=lambda c: int(covered[c[1] : c[1] + bh, c[0] : c[0] + bw].sum()))
    return x, y, x + bw, y + bh
