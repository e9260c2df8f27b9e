"""The retrieval-method interface: its registry, the options every method shares, its inputs and outputs.

A method is two things registered under one name:
- a **config dataclass** (frozen) that subclasses `RetrievalConfig`, with `name: str = "<name>"`, its own options
  as typed fields with defaults, and their checks in `__post_init__`;
- a **candidate function** `(cfg, inputs: RetrievalInputs) -> Candidates`: for each of an image's K valid peaks,
  one mask or none.

    @register_method("toy", config=ToyConfig)
    def toy_candidates(cfg: ToyConfig, inputs: RetrievalInputs) -> Candidates: ...

Everything else is shared and lives in `ranprm.prm.retrieval.scoring` (the background map, peak strength, mass,
foreground, the confidence, NMS with PRM merging), applied by `ranprm.prm.retrieval.retrieve_instances`. A new
method is one new module in this package (or in a `RANPRM_PLUGINS` module); `retrieval=<name>` then selects it
with no YAML file (the registry is the `retrieval` Hydra group).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from torch import Tensor

from ranprm.errors import ConfigError
from ranprm.prm.peaks import ImagePeaks
from ranprm.utils.registry import Registry

BACKGROUND_RULES = ("official", "bilinear")
NMS_MERGES = ("masked", "whole", "none")
NMS_ORDERS = ("score", "value")


@dataclass(frozen=True)
class RetrievalConfig:
    """Options every method has (the shared scoring reads them).

    background: how the class map's background BG_c is cut (`ranprm.prm.retrieval.scoring.background_masks`):
                `official` (PRM's: the CRM resized bicubically after scipy's bytescale to 0..255) or `bilinear`
                (ours: the raw CRM resized bilinearly)
    bg_factor:  BG_c = CRM_c < bg_factor * mean(CRM_c) on that map (PRM: 0.95)
    min_area, max_area: a candidate covering < min_area or >= max_area of the image yields no instance
                (PRM: 0.002% and 85% of the image); max_area null: no upper bound
    nms_iou:    NMS suppresses a later instance whose mask IoU with a kept one is >= nms_iou (PRM: 0.3)
    nms_per_class: false: class-agnostic NMS, as PRM's official code; true: within one class only
    nms_merge:  what a kept instance's PRM absorbs from those it suppresses (display only; masks and scores do not
                depend on it): `whole` PRMs (PRM's official merge), the part inside their `masked` mask (ours),
                or `none`
    nms_order:  the order NMS visits instances in: `score`, ranprm's confidence (ours), or `value`, the method's
                own retrieval value (PRM's official order; only for methods that give one, e.g. `proposals`)
    size:       retrieve at size x size pixels and bring the masks back to the image (nearest): PRM's official
                code resizes the image, the proposals and the maps to the network input, 448 x 448, before scoring
                (the background penalty weighs H*W pixels); null (the default): at the image's own size
    """

    name: str = ""
    background: str = "official"
    bg_factor: float = 0.95
    min_area: float = 2e-5
    max_area: float | None = 0.85
    nms_iou: float = 0.3
    nms_per_class: bool = False
    nms_merge: str = "whole"
    nms_order: str = "score"
    size: int | None = None

    def __post_init__(self) -> None:
        if self.background not in BACKGROUND_RULES:
            raise ConfigError(f"retrieval.background={self.background!r} is unknown; choose official or bilinear")
        if not np.isfinite(self.bg_factor):
            raise ConfigError(f"retrieval.bg_factor={self.bg_factor} must be a finite number")
        if not 0.0 <= self.min_area < 1.0:
            raise ConfigError(f"retrieval.min_area={self.min_area} must lie in [0, 1)")
        if self.max_area is not None and not self.min_area < self.max_area <= 1.0:
            raise ConfigError(f"retrieval.max_area={self.max_area} must lie in (min_area, 1] or be null")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ConfigError(f"retrieval.nms_iou={self.nms_iou} must lie in (0, 1]")
        if self.nms_merge not in NMS_MERGES:
            raise ConfigError(f"retrieval.nms_merge={self.nms_merge!r} is unknown; choose whole, masked or none")
        if self.nms_order not in NMS_ORDERS:
            raise ConfigError(f"retrieval.nms_order={self.nms_order!r} is unknown; choose score or value")
        if self.size is not None and (isinstance(self.size, bool) or self.size < 1):
            raise ConfigError(f"retrieval.size={self.size} must be a positive number of pixels (448: PRM's) or null")

    def proposal_source(self) -> Hashable | None:
        """What this method's segment proposals depend on besides the image (a hashable key), or None when it
        uses none: callers build an image's proposals once per key (`make_proposals`) and share them."""
        return None

    def make_proposals(self, image: np.ndarray) -> np.ndarray:
        """(P, H, W) bool segment proposals of an RGB uint8 image (H, W, 3), in rank order."""
        raise NotImplementedError(f"retrieval method {self.name!r} uses no proposals")


@dataclass(frozen=True, eq=False)
class RetrievalInputs:
    """What a method sees of one image with K valid peaks (all tensors on one device).

    prms:        (K, H, W) float >= 0 at the image size, each map's maximum 1 (`sum_normalised_prms()` gives
                 PRM's official normalisation, sum 1)
    peaks:       the K peaks in image pixels (yx, labels, values)
    class_logits:(C,) the image's class scores
    background:  (K, H, W) bool, BG_c of each peak's class by the config's `background` rule
    image:       (H, W, 3) uint8 RGB, or None when the caller has none
    proposals:   (P, H, W) bool segment proposals in rank order given by the caller, or None
    """

    prms: Tensor
    peaks: ImagePeaks
    class_logits: Tensor
    background: Tensor
    image: np.ndarray | None = None
    proposals: Tensor | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.prms.shape[1]), int(self.prms.shape[2])

    def sum_normalised_prms(self) -> Tensor:
        """(K, H, W) each PRM divided by its sum (PRM's `prm / prm.sum()`): what PRM's proposal score expects."""
        prms = self.prms.float()
        return prms / prms.flatten(1).sum(1).clamp_min(1e-30)[:, None, None]


@dataclass(frozen=True, eq=False)
class Candidates:
    """A method's answer: found (K,) bool, masks (K, H, W) bool (meaningful where found), and optionally the
    method's own retrieval value of each mask (K,) float (e.g. PRM's proposal score), for `nms_order: value`."""

    found: Tensor
    masks: Tensor
    values: Tensor | None = None


CandidateFn = Callable[[Any, RetrievalInputs], Candidates]
F = TypeVar("F", bound=CandidateFn)

RETRIEVAL_METHODS: Registry[CandidateFn] = Registry("retrieval method", "retrieval.name", group="retrieval")


def register_method(name: str, *, config: type[RetrievalConfig]) -> Callable[[F], F]:
    """Register a candidate function under `name` with its config dataclass (a `RetrievalConfig` subclass)."""
    if not (isinstance(config, type) and issubclass(config, RetrievalConfig)):
        raise TypeError(f"retrieval method {name!r}: config must subclass RetrievalConfig, got {config!r}")
    return RETRIEVAL_METHODS.register(name, config=config)  # type: ignore[return-value]
