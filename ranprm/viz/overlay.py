"""The `ranprm-predict` overlay: one image with its instances filled and outlined, peaks marked, names and scores.

Pure rendering: an RGB uint8 array and `Instances` in, an RGB uint8 array out. It draws with the same kit
(`ranprm.viz.draw`) and the same instance drawing as the panels' prediction tile, sized for a full photo.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from ranprm.prm.instances import Instances
from ranprm.viz import draw


def render_overlay(
    image: np.ndarray,
    instances: Instances,
    class_names: Sequence[str],
    peaks: Tensor | np.ndarray | None = None,
    alpha: float = 0.45,
) -> np.ndarray:
    """Instances over `image` (H, W, 3) uint8 RGB; masks must be at the image's size.

    Each instance (highest score on top) is filled with its colour at `alpha`, outlined, its seeding peak marked
    with a tilted cross in its colour, and labelled "<class> <score>" at its mask's top-left corner (at the peak
    when the mask is empty). `peaks` (K, 3) [class, y, x] in image pixels are further peaks to mark with a white
    cross (e.g. every valid peak).
    """
    img = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    h, w = img.shape[:2]
    masks = instances.masks.detach().cpu().numpy().astype(np.uint8)
    if len(masks) and masks.shape[1:] != (h, w):
        raise ValueError(f"render_overlay: masks are {masks.shape[1:]}, the image is {(h, w)}")
    # Sized for a whole photo: thinner lines and smaller text than a panel tile of the same width.
    marker = max(5, round(min(h, w) / 40))
    thickness = max(1, round(min(h, w) / 200))
    names = [class_names[c] if 0 <= c < len(class_names) else str(c) for c in instances.labels.cpu().tolist()]
    scores = instances.scores.detach().float().cpu().tolist()
    out = draw.draw_instances(
        img,
        masks,
        draw.to_numpy(instances.peaks).reshape(-1, 2),
        [f"{name} {score:.2f}" for name, score in zip(names, scores, strict=True)],
        alpha=alpha,
        marker=marker,
        font_scale=float(np.clip(min(h, w) / 700, 0.3, 1.0)),
        thickness=thickness,
    )
    if peaks is not None:
        for _, y, x in draw.to_numpy(peaks).reshape(-1, 3):
            draw.draw_peak(out, y, x, marker, thickness)
    return out
