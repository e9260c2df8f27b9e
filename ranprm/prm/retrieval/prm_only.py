"""`prm_only` (ours, proposal-free): threshold the PRM, gate it by the class map, keep the peak's component.

For peak k of class c, with its PRM at the image size:
    1. Smooth the PRM with a Gaussian of sigma = smooth * min(H, W) pixels (PRMs are speckled at pixel level;
       0 turns it off) and re-normalise it to a maximum of 1. The threshold therefore reads the PRM relative to
       its own maximum, whatever its normalisation: a max-normalised and a sum-normalised PRM give the same mask.
    2. Foreground = smoothed PRM >= threshold; with `gate`, also not BG_c (the class map must agree).
    3. Keep the 8-connected component (cv2.connectedComponents) holding the peak pixel (the peak rounded to the
       nearest pixel). When the peak pixel is not foreground, keep the component of the foreground pixel nearest
       to it (Euclidean; the first in raster order on ties), so a peak sitting just off its response still gets
       its region. No foreground at all, or a component outside [min_area, max_area) of the image, yields no
       instance.
Its defaults keep ranprm's first retrieval exactly: the `bilinear` background, no upper area bound, and the
`masked` PRM merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ranprm.errors import ConfigError
from ranprm.prm.retrieval.base import Candidates, RetrievalConfig, RetrievalInputs, register_method
from ranprm.prm.retrieval.scoring import size_ok


@dataclass(frozen=True)
class PrmOnlyConfig(RetrievalConfig):
    """`retrieval: prm_only` (module docstring); the shared options are `RetrievalConfig`'s.

    threshold: foreground = smoothed, re-normalised PRM >= threshold
    smooth:    Gaussian sigma as a fraction of the image's shorter side; 0: off
    gate:      also require the pixel not to be the class map's background
    """

    name: str = "prm_only"
    background: str = "bilinear"
    max_area: float | None = None
    nms_merge: str = "masked"
    threshold: float = 0.2
    smooth: float = 0.01
    gate: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"retrieval.threshold={self.threshold} must lie in (0, 1]")
        if not 0.0 <= self.smooth <= 0.5:
            raise ConfigError(f"retrieval.smooth={self.smooth} must lie in [0, 0.5] (a fraction of the shorter side)")
        if self.nms_order != "score":
            raise ConfigError(f"retrieval.nms_order={self.nms_order!r}: prm_only has no retrieval value; use score")


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of maps (N, H, W) with replicate borders; sigma in pixels (0: unchanged)."""
    if sigma <= 0 or len(maps) == 0:
        return maps
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.pad(maps[:, None].float(), (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1))
    return out[:, 0]


def peak_component(mask: np.ndarray, peak_yx: tuple[int, int]) -> np.ndarray | None:
    """The 8-connected component of mask (H, W) bool that holds the peak pixel, or the one nearest to it.

    Returns a (H, W) bool mask, or None when the mask is empty (module docstring, step 3).
    """
    count, comp = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return None
    py, px = peak_yx
    label = int(comp[py, px])
    if label == 0:
        ys, xs = np.nonzero(comp)  # raster order, so argmin's first-hit rule breaks ties by raster order
        nearest = int(np.argmin((ys - py) ** 2 + (xs - px) ** 2))
        label = int(comp[ys[nearest], xs[nearest]])
    return comp == label


@register_method("prm_only", config=PrmOnlyConfig)
def prm_only_candidates(cfg: PrmOnlyConfig, inputs: RetrievalInputs) -> Candidates:
    """One mask per peak from its own PRM (module docstring)."""
    prms = inputs.prms
    k, h, w = prms.shape
    smooth = gaussian_blur(prms.float(), cfg.smooth * min(h, w))
    smooth = smooth / smooth.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    fg = smooth >= cfg.threshold
    if cfg.gate:
        fg &= ~inputs.background
    fg_np = fg.cpu().numpy()
    peaks = inputs.peaks.yx.detach().cpu().round().long()
    peaks[:, 0].clamp_(0, h - 1)
    peaks[:, 1].clamp_(0, w - 1)
    masks = np.zeros((k, h, w), dtype=bool)
    found = np.zeros(k, dtype=bool)
    for i in range(k):  # one cv2 call per peak: K is small, the pixel work is in C
        component = peak_component(fg_np[i], (int(peaks[i, 0]), int(peaks[i, 1])))
        if component is not None:
            masks[i], found[i] = component, True
    masks_t = torch.from_numpy(masks).to(prms.device)
    found_t = torch.from_numpy(found).to(prms.device)
    found_t &= size_ok(masks_t.flatten(1).sum(1).float(), h * w, cfg.min_area, cfg.max_area)
    return Candidates(found_t, masks_t)
