"""Instance retrieval: from the peak response maps (PRMs) of one image to scored instance masks.

Methods, one module each, registered in `RETRIEVAL_METHODS` (the `retrieval` config group):
- `prm_only` (ours, proposal-free, the default): `ranprm.prm.retrieval.prm_only`;
- `proposals` (PRM's proposal score, as published): `ranprm.prm.retrieval.proposals`, over selective-search
  proposals from `ranprm.prm.retrieval.selective_search`.
The interface a method implements is in `base`; what every method shares (background, confidence, NMS) is in
`scoring`. `build_retrieval` parses a `retrieval` config once; `retrieve_instances` runs one image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ranprm.errors import ConfigError
from ranprm.prm.instances import Instances
from ranprm.prm.peaks import ImagePeaks
from ranprm.prm.retrieval.base import (
    RETRIEVAL_METHODS,
    Candidates,
    RetrievalConfig,
    RetrievalInputs,
    register_method,
)
from ranprm.prm.retrieval.scoring import (
    background_masks,
    confidence_scores,
    instance_nms,
    mass_and_foreground,
    peak_strength,
)
from ranprm.utils.registry import import_submodules
from ranprm.utils.typed_config import from_mapping

import_submodules(__name__)  # every method module registers itself

DEFAULT_METHOD = "prm_only"

__all__ = [
    "DEFAULT_METHOD",
    "RETRIEVAL_METHODS",
    "Candidates",
    "RetrievalConfig",
    "RetrievalInputs",
    "build_retrieval",
    "register_method",
    "retrieve_instances",
]


def build_retrieval(cfg: Mapping[str, Any] | RetrievalConfig | None) -> RetrievalConfig:
    """The parsed config of the method a `retrieval` config names (a mapping with `name`; None: prm_only)."""
    if isinstance(cfg, RetrievalConfig):
        return cfg
    if cfg is None:
        return RETRIEVAL_METHODS.entry(DEFAULT_METHOD).config()  # type: ignore[misc]
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"retrieval must be a mapping with a name, got {type(cfg).__name__}")
    entry = RETRIEVAL_METHODS.entry(str(cfg.get("name")))
    return from_mapping(entry.config, {**cfg, "name": entry.name}, "retrieval")  # type: ignore[arg-type]


def _check_inputs(prms: Tensor, peaks: ImagePeaks, class_logits: Tensor, crms: Tensor) -> None:
    if crms.ndim != 3 or class_logits.shape != crms.shape[:1]:
        raise ValueError(
            f"crms must be (C, h, w) and class_logits (C,), got {tuple(crms.shape)}, {tuple(class_logits.shape)}"
        )
    k = len(prms)
    if prms.ndim != 3:
        raise ValueError(f"prms must be (K, H, W) at the image size, got {tuple(prms.shape)}")
    if peaks.yx.shape != (k, 2) or peaks.labels.shape != (k,) or peaks.values.shape != (k,):
        raise ValueError(
            f"peaks need yx (K, 2), labels (K,), values (K,) with K={k}, got "
            f"{tuple(peaks.yx.shape)}, {tuple(peaks.labels.shape)}, {tuple(peaks.values.shape)}"
        )
    if k and (int(peaks.labels.min()) < 0 or int(peaks.labels.max()) >= len(class_logits)):
        raise ValueError(f"peak labels must lie in [0, {len(class_logits)})")


@torch.no_grad()
def retrieve_instances(
    cfg: RetrievalConfig,
    prms: Tensor,
    peaks: ImagePeaks,
    class_logits: Tensor,
    crms: Tensor,
    image: np.ndarray | None = None,
    proposals: np.ndarray | Tensor | None = None,
) -> Instances:
    """Instances of one image from its K valid peaks.

    cfg:          a parsed retrieval config (`build_retrieval`), which names the method
    prms:         (K, H, W) float >= 0 at the image size, each map's maximum 1
    peaks:        the K peaks in image pixels (`ImagePeaks`: yx, labels, values = raw CRM values)
    class_logits: (C,) the image's class scores
    crms:         (C, h, w) the image's raw class response maps (the background map is cut from them)
    image:        (H, W, 3) uint8 RGB, for methods that need it (selective search)
    proposals:    (P, H, W) bool segment proposals in rank order, overriding selective search
    Returns Instances on prms' device, highest score first; K = 0 gives Instances.empty.
    """
    if not isinstance(cfg, RetrievalConfig):
        raise TypeError(f"retrieve_instances needs a parsed config (build_retrieval), got {type(cfg).__name__}")
    _check_inputs(prms, peaks, class_logits, crms)
    h, w = int(prms.shape[1]), int(prms.shape[2])
    device = prms.device
    if len(prms) == 0:
        return Instances.empty((h, w), device=device)
    peaks = peaks.to(device)
    labels = peaks.labels.long()
    background = background_masks(crms.to(device), labels, (h, w), cfg.bg_factor, cfg.background)
    if isinstance(proposals, np.ndarray):
        proposals = torch.from_numpy(np.ascontiguousarray(proposals))
    inputs = RetrievalInputs(prms, peaks, class_logits.to(device), background, image, proposals)
    candidates = RETRIEVAL_METHODS.get(cfg.name)(cfg, inputs)
    masks = candidates.masks
    mass, foreground = mass_and_foreground(prms, masks, background)
    strength = peak_strength(labels, peaks.values.to(device))
    scores = confidence_scores(inputs.class_logits, labels, strength, mass, foreground)
    rows = candidates.found.nonzero(as_tuple=True)[0]
    if len(rows) == 0:
        return Instances.empty((h, w), device=device)
    if cfg.nms_order == "value" and candidates.values is None:
        raise ConfigError(f"retrieval.nms_order=value: method {cfg.name!r} gives no retrieval value; use score")
    ranking = candidates.values if cfg.nms_order == "value" else scores
    keep, merged = instance_nms(
        masks[rows], prms[rows], ranking[rows], labels[rows], cfg.nms_iou, cfg.nms_per_class, cfg.nms_merge
    )
    rows = rows[keep]
    if cfg.nms_order == "value":  # the output lists the highest confidence first whatever NMS visited first
        by_score = torch.sort(scores[rows], descending=True, stable=True).indices
        rows, merged = rows[by_score], merged[by_score]
    return Instances(
        image_size=(h, w),
        masks=masks[rows],
        labels=labels[rows],
        scores=scores[rows].float(),
        peaks=peaks.yx[rows].float(),
        prms=merged,
    )
