"""The `ranprm-predict` overlay: one image with its instances filled and outlined, peaks marked, names and scores.

Pure rendering: an RGB uint8 array and `Instances` in, an RGB uint8 array out (OpenCV drawing, no pyplot).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from torch import Tensor

from ranprm.prm.instances import Instances

_FONT = cv2.FONT_HERSHEY_SIMPLEX
# Distinct, saturated colours (tab10 without grey); instance i takes colour i mod 10.
_COLOURS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (255, 215, 0),
)  # fmt: skip


def _text_box(img: np.ndarray, text: str, x: int, y: int, colour: tuple[int, int, int], scale: float) -> None:
    (w, h), base = cv2.getTextSize(text, _FONT, scale, 1)
    x = int(np.clip(x, 0, max(0, img.shape[1] - w - 4)))
    y = int(np.clip(y, 0, max(0, img.shape[0] - h - base - 4)))
    cv2.rectangle(img, (x, y), (x + w + 3, y + h + base + 3), colour, -1)
    ink = (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else (255, 255, 255)
    cv2.putText(img, text, (x + 2, y + h + 1), _FONT, scale, ink, 1, cv2.LINE_AA)


def render_overlay(
    image: np.ndarray,
    instances: Instances,
    class_names: Sequence[str],
    peaks: Tensor | np.ndarray | None = None,
    alpha: float = 0.45,
) -> np.ndarray:
    """Instances over `image` (H, W, 3) uint8 RGB; masks must be at the image's size.

    Each instance is filled with its colour at `alpha`, outlined, and labelled "<class> <score>" at its seeding
    peak (or its mask's top-left corner). `peaks` (K, 3) [class, y, x] in image pixels are extra peaks to mark
    (e.g. every valid peak); each instance's own peak is always marked.
    """
    img = np.ascontiguousarray(image[..., :3], dtype=np.uint8).copy()
    h, w = img.shape[:2]
    masks = instances.masks.detach().cpu().numpy().astype(bool)
    if len(masks) and masks.shape[1:] != (h, w):
        raise ValueError(f"render_overlay: masks are {masks.shape[1:]}, the image is {(h, w)}")
    labels = instances.labels.detach().cpu().tolist()
    scores = instances.scores.detach().cpu().tolist()
    inst_peaks = instances.peaks.detach().cpu().double().numpy().reshape(-1, 2)
    thickness = max(1, round(min(h, w) / 200))
    scale = float(np.clip(min(h, w) / 700, 0.3, 1.0))
    marker = max(5, round(min(h, w) / 40))

    out = img.astype(np.float32)
    for i, mask in enumerate(masks):
        colour = np.array(_COLOURS[i % len(_COLOURS)], np.float32)
        out[mask] = out[mask] * (1 - alpha) + colour * alpha
    out = (out + 0.5).clip(0, 255).astype(np.uint8)
    for i, mask in enumerate(masks):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, _COLOURS[i % len(_COLOURS)], thickness, cv2.LINE_AA)

    def mark(y: float, x: float) -> None:
        if np.isfinite(y) and np.isfinite(x):
            p = (round(float(x)), round(float(y)))
            cv2.drawMarker(out, p, (0, 0, 0), cv2.MARKER_CROSS, marker + 2, thickness + 2, cv2.LINE_AA)
            cv2.drawMarker(out, p, (255, 255, 255), cv2.MARKER_CROSS, marker, thickness, cv2.LINE_AA)

    if peaks is not None:
        for _, y, x in np.asarray(peaks, dtype=np.float64).reshape(-1, 3):
            mark(y, x)
    for i, label in enumerate(labels):
        y, x = inst_peaks[i]
        mark(y, x)
        if not (np.isfinite(y) and np.isfinite(x)):
            ys, xs = np.nonzero(masks[i])
            y, x = (float(ys.min()), float(xs.min())) if len(ys) else (0.0, 0.0)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        _text_box(out, f"{name} {scores[i]:.2f}", int(x) + marker, int(y) + marker, _COLOURS[i % 10], scale)
    return out
