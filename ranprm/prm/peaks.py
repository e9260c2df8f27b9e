"""Peak finding and peak stimulation on class response maps (CRMs).

Conventions: a CRM batch is a `Tensor (B, C, h, w)` of raw class logits per location. Peaks are local maxima in a
`window x window` neighbourhood, found after an optional bilinear up-sampling by the sub-pixel factor (PRM uses 8
while training, 1 at inference).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

PeakFilter = Literal["median", "mean", "max", "none"]


def upsample_crm(crm: Tensor, factor: int) -> Tensor:
    """Bilinear up-sampling by an integer factor, `align_corners=True` as in PRM: (B, C, h, w) -> (B, C, h*f, w*f)."""
    if factor == 1:
        return crm
    return F.interpolate(crm, scale_factor=factor, mode="bilinear", align_corners=True)


def local_maxima(crm: Tensor, window: int = 3) -> Tensor:
    """Bool mask (B, C, h, w) of the locations that hold the maximum of their window.

    The map is padded with -inf so borders compete only with real values. Among equal values max-pooling returns
    the first index, so a plateau yields one peak, not many.
    """
    if window % 2 != 1:
        raise ValueError(f"peak window must be odd, got {window}")
    b, c, h, w = crm.shape
    pad = window // 2
    padded = F.pad(crm, (pad, pad, pad, pad), value=float("-inf"))
    _, indices = F.max_pool2d(padded, kernel_size=window, stride=1, return_indices=True)
    own = torch.arange((h + 2 * pad) * (w + 2 * pad), device=crm.device).view(h + 2 * pad, w + 2 * pad)
    own = own[pad : pad + h, pad : pad + w]
    return indices == own


def peak_filter_value(crm: Tensor, kind: PeakFilter | float) -> Tensor:
    """Per-map floor that a local maximum must reach to count as a peak: (B, C, 1, 1).

    PRM's official training filter is the median of the map; `none` keeps every local maximum, a float is a fixed
    floor.
    """
    flat = crm.flatten(2)
    if isinstance(kind, int | float) and not isinstance(kind, bool):
        value = torch.full_like(flat[..., :1], float(kind))
    elif kind == "median":
        value = flat.median(dim=2, keepdim=True).values
    elif kind == "mean":
        value = flat.mean(dim=2, keepdim=True)
    elif kind == "max":
        value = flat.amax(dim=2, keepdim=True)
    elif kind == "none":
        value = torch.full_like(flat[..., :1], float("-inf"))
    else:
        raise ValueError(f"unknown peak filter {kind!r}; use median, mean, max, none or a number")
    return value.unsqueeze(-1)


def find_peaks(crm: Tensor, window: int = 3, peak_filter: PeakFilter | float = "median") -> Tensor:
    """Bool mask (B, C, h, w) of peaks: local maxima that reach the map's filter value."""
    with torch.no_grad():
        return local_maxima(crm, window) & (crm >= peak_filter_value(crm, peak_filter))


def stimulated_scores(crm: Tensor, peaks: Tensor, full_peak_gradient: bool = True) -> Tensor:
    """Class scores (B, C) as the mean CRM value at the peaks.

    With `full_peak_gradient` the backward gives every peak the whole upstream gradient, as PRM's official
    `PeakStimulation` does (its backward has no 1/N); the forward value is still the mean.
    """
    weights = peaks.to(crm.dtype)
    count = weights.flatten(2).sum(2).clamp_min(1.0)
    total = (crm * weights).flatten(2).sum(2)
    mean = total / count
    if not full_peak_gradient:
        return mean
    # forward: the mean; backward: d(total), i.e. every peak receives the full gradient.
    return total + (mean - total).detach()


def class_scores(
    crm: Tensor,
    stimulation: bool = True,
    window: int = 3,
    peak_filter: PeakFilter | float = "median",
    sub_pixel_factor: int = 1,
    full_peak_gradient: bool = True,
) -> Tensor:
    """Class logits (B, C) from CRMs: peak stimulation, or global average pooling when it is off."""
    if not stimulation:
        return crm.mean(dim=(2, 3))
    fine = upsample_crm(crm, sub_pixel_factor)
    return stimulated_scores(fine, find_peaks(fine, window, peak_filter), full_peak_gradient)


def peak_coordinates(peaks: Tensor) -> Tensor:
    """(K, 4) long tensor of `[batch, class, y, x]` for every True entry of a (B, C, h, w) peak mask."""
    return peaks.nonzero(as_tuple=False)


def to_image_coordinates(
    yx: Tensor, crm_size: tuple[int, int], sub_pixel_factor: int, image_size: tuple[int, int]
) -> Tensor:
    """Map peak positions on the (up-sampled) CRM grid to pixel positions in the input image: (K, 2) float.

    A position `i` on a grid up-sampled with `align_corners=True` from `h` to `h * f` sits at CRM coordinate
    `i * (h - 1) / (h * f - 1)`. CRM cell `u` covers image rows `[u * s, (u + 1) * s)` with `s = H / h`, so its
    centre is `(u + 0.5) * s - 0.5`.
    """
    out = yx.to(torch.float32).clone()
    for dim, (h, size) in enumerate(zip(crm_size, image_size, strict=True)):
        fine = h * sub_pixel_factor
        u = out[:, dim] * ((h - 1) / (fine - 1)) if fine > 1 else out[:, dim] * 0
        out[:, dim] = (u + 0.5) * (size / h) - 0.5
    return out
