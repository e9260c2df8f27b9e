"""Peak finding and peak stimulation on class response maps (CRMs).

Conventions: a CRM batch is a `Tensor (B, C, h, w)` of raw class logits per location. Peaks are local maxima in a
`window x window` neighbourhood that reach the map's peak filter (a threshold rule over the map's values, PRM's
median), found after an optional bilinear up-sampling by the sub-pixel factor (PRM uses 8 while training, 1 at
inference).

Peaks have one name per form:
- a **peak mask** `(B, C, h', w')` bool (`peak_mask`), on the CRM grid up-sampled by the sub-pixel factor;
- **grid peaks** (`GridPeaks`): the mask's True entries as rows `[batch, class, y, x]` (K, 4) long on that grid,
  with their CRM values; what peak backpropagation seeds from;
- **image peaks** (`ImagePeaks`): one image's peaks in its own pixels, `yx (K, 2)` float, `labels (K,)`,
  `values (K,)`; what retrieval, evaluation and drawing read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ranprm.errors import ConfigError
from ranprm.prm.thresholds import ThresholdRule, build_rule


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


def peak_filter_value(crm: Tensor, peak_filter: ThresholdRule | str | float) -> Tensor:
    """Per-map floor (B, C, 1, 1) that a local maximum must reach: the rule's cut-off over the map's values.

    PRM's official training filter is `median` (`torch.median` of the flattened map); `none` keeps every local
    maximum, a number is a fixed floor. Any threshold rule (`ranprm.prm.thresholds`) can serve.
    """
    rule = build_rule(peak_filter, "head.peak_filter")
    return rule.cutoff(crm.flatten(2))[..., None, None].to(crm.dtype)


def peak_mask(crm: Tensor, window: int = 3, peak_filter: ThresholdRule | str | float = "median") -> Tensor:
    """Bool mask (B, C, h, w) of peaks: local maxima that reach the map's filter value."""
    with torch.no_grad():
        return local_maxima(crm, window) & (crm >= peak_filter_value(crm, peak_filter))


def stimulated_scores(crm: Tensor, peaks: Tensor, full_peak_gradient: bool = True) -> Tensor:
    """Class scores (B, C) as the mean CRM value at the peaks of the peak mask `peaks` (B, C, h, w).

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
    peak_filter: ThresholdRule | str | float = "median",
    sub_pixel_factor: int = 1,
    full_peak_gradient: bool = True,
) -> Tensor:
    """Class logits (B, C) from CRMs: peak stimulation, or global average pooling when it is off."""
    if not stimulation:
        return crm.mean(dim=(2, 3))
    fine = upsample_crm(crm, sub_pixel_factor)
    return stimulated_scores(fine, peak_mask(fine, window, peak_filter), full_peak_gradient)


@dataclass(frozen=True)
class PeakHead:
    """The peak-stimulation head (`head` config), parsed once: the training score and the class test.

    stimulation:        False: global average pooling instead of peaks
    window:             a peak is the maximum of its window x window neighbourhood (odd)
    peak_filter:        the per-map rule a local maximum must reach (PRM: median)
    sub_pixel_factor:   up-sampling before peak finding for the training score (PRM trains with 8)
    full_peak_gradient: PRM's backward (every peak gets the full gradient, no 1/N)
    """

    stimulation: bool = True
    window: int = 3
    peak_filter: ThresholdRule = build_rule("median", "head.peak_filter")
    sub_pixel_factor: int = 8
    full_peak_gradient: bool = True

    def __post_init__(self) -> None:
        if self.window < 1 or self.window % 2 == 0:
            raise ConfigError(f"head.window={self.window} must be an odd number >= 1")
        if self.sub_pixel_factor < 1:
            raise ConfigError(f"head.sub_pixel_factor={self.sub_pixel_factor} must be >= 1")

    @classmethod
    def from_config(cls, head: Mapping[str, Any]) -> PeakHead:
        known = {"stimulation", "window", "peak_filter", "sub_pixel_factor", "full_peak_gradient"}
        unknown = sorted(set(head) - known)
        if unknown:
            raise ConfigError(f"head: unknown option(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(
                stimulation=_flag(head.get("stimulation", True), "head.stimulation"),
                window=int(head.get("window", 3)),
                peak_filter=build_rule(head.get("peak_filter", "median"), "head.peak_filter"),
                sub_pixel_factor=int(head.get("sub_pixel_factor", 8)),
                full_peak_gradient=_flag(head.get("full_peak_gradient", True), "head.full_peak_gradient"),
            )
        except (TypeError, ValueError) as err:
            raise ConfigError(f"head: window and sub_pixel_factor must be integers ({err})") from err

    def scores(self, crm: Tensor, sub_pixel_factor: int | None = None) -> Tensor:
        """Class logits (B, C) of CRMs (B, C, h, w); `sub_pixel_factor` None: the training factor."""
        factor = self.sub_pixel_factor if sub_pixel_factor is None else sub_pixel_factor
        return class_scores(crm, self.stimulation, self.window, self.peak_filter, factor, self.full_peak_gradient)


def _flag(value: Any, option: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{option}={value!r} must be true or false")


@dataclass(frozen=True)
class GridPeaks:
    """Peaks of a CRM batch on its grid up-sampled by `sub_pixel_factor`.

    index:  (K, 4) long `[batch, class, y, x]` on the up-sampled grid, sorted by batch, then class, then position
    values: (K,) float, the up-sampled CRM's value at each peak
    grid_size: (h, w) of the CRMs before up-sampling
    """

    index: Tensor
    values: Tensor
    grid_size: tuple[int, int]
    sub_pixel_factor: int = 1

    @classmethod
    def from_mask(cls, mask: Tensor, fine_crms: Tensor, grid_size: tuple[int, int], sub_pixel_factor: int) -> GridPeaks:
        """The True entries of a peak mask (B, C, h', w') with their values in the up-sampled CRMs (same shape)."""
        index = mask.nonzero(as_tuple=False)
        values = fine_crms[index[:, 0], index[:, 1], index[:, 2], index[:, 3]]
        return cls(index, values, (int(grid_size[0]), int(grid_size[1])), int(sub_pixel_factor))

    def __len__(self) -> int:
        return len(self.index)

    def select(self, keep: Tensor) -> GridPeaks:
        """The peaks selected by a bool mask or an index tensor (K',), order kept."""
        return GridPeaks(self.index[keep], self.values[keep], self.grid_size, self.sub_pixel_factor)

    def rows_of(self, batch: int) -> Tensor:
        """(K_b,) indices of the peaks of image `batch`."""
        return (self.index[:, 0] == batch).nonzero(as_tuple=True)[0]

    def in_image(self, batch: int, image_size: tuple[int, int]) -> ImagePeaks:
        """Image `batch`'s peaks in the pixels of that image at `image_size` (H, W)."""
        rows = self.rows_of(batch)
        yx = to_image_coordinates(self.index[rows, 2:], self.grid_size, self.sub_pixel_factor, image_size)
        return ImagePeaks(yx=yx, labels=self.index[rows, 1], values=self.values[rows].float())


@dataclass(frozen=True)
class ImagePeaks:
    """One image's peaks in its own pixels.

    yx:     (K, 2) float (y, x), pixel centres of the image at its original size
    labels: (K,) long, 0-based class
    values: (K,) float, the raw CRM value at the peak (what the peak threshold compared)
    """

    yx: Tensor
    labels: Tensor
    values: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self) -> Tensor:
        """(K, 3) float `[class, y, x]`, the layout the panels and overlays draw."""
        return torch.cat([self.labels[:, None].float(), self.yx.float()], 1)

    def to(self, device: torch.device | str) -> ImagePeaks:
        return ImagePeaks(self.yx.to(device), self.labels.to(device), self.values.to(device))


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
