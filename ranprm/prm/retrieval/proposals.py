"""`proposals`: PRM's proposal retrieval (Zhou et al. 2018; official `instance_seg`), as published.

Segment proposals S come in rank order, from the caller or from selective search
(`ranprm.prm.retrieval.selective_search`; the paper used MCG, which is not shipped), and only the first
`proposal_count` (PRM: 100) are scored, as the official loop `for j in range(min(proposal_count, len(proposals)))`
does; the size limit then skips proposals covering >= max_area or < min_area of the image. Peak k of class c
keeps the proposal with the highest

    R(k, S) = balance * sum(PRM_k[S]) + sum(PRM_k[contour(S)]) - penalty * sum(BG_c[S])

(the first in rank order on ties; R is the instance's value, by which NMS visits instances as the official code
does, `nms_order: value`), with PRM_k **normalised to sum 1** (official `prm / prm.sum()`): the penalty
(1e-5 per background pixel) is calibrated for that scale. On maps normalised to a maximum of 1 the PRM terms are
~1000x larger at 448 px and the penalty loses its effect, so proposals leaking far into the background win.
BG_c is the `official` background (`ranprm.prm.retrieval.scoring`). contour(S) is the morphological gradient with
a contour_size x contour_size square, exactly `cv2.morphologyEx(S, MORPH_GRADIENT, ones)`. A peak whose scored
proposals are all skipped yields no instance.

Each term is one matmul over flattened masks, (K, HW) @ (HW, P), chunked over proposals to bound memory.
Cost: ~0.75 s for ~600 proposals x 5 peaks at 500x375 on one CPU thread (memory-bound matmuls); ~100 proposals
cost a sixth of that.

What still differs from the paper: selective search instead of MCG (a different proposal set and rank). The
official code retrieves at the network input size, 448 x 448 (image, proposals and maps resized there, the mask
back to the image): `retrieval.size=448` (on in `experiment=prm_voc`); by default ranprm retrieves at the image's
own size.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ranprm.errors import ConfigError
from ranprm.prm.retrieval.base import Candidates, RetrievalConfig, RetrievalInputs, register_method
from ranprm.prm.retrieval.scoring import contour_masks, size_ok
from ranprm.prm.retrieval.selective_search import SelectiveSearchConfig, proposal_masks

# Max elements of one (proposals x pixels) float chunk in proposal scoring: 2^24 floats, 64 MiB a temporary.
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class ProposalRetrievalConfig(RetrievalConfig):
    """`retrieval: proposals` (module docstring); the shared options are `RetrievalConfig`'s.

    balance, penalty: PRM's score weights (0.8, 1e-5)
    contour_size:     the contour band's square (PRM: 5)
    proposal_count:   score only the first N proposals in rank order (PRM: 100); null: all of them
    search:           selective-search options (`SelectiveSearchConfig`)
    cache_dir:        on-disk proposal cache (keyed by image content and the search options); null: off
    """

    name: str = "proposals"
    nms_order: str = "value"
    balance: float = 0.8
    penalty: float = 1e-5
    contour_size: int = 5
    proposal_count: int | None = 100
    search: SelectiveSearchConfig = field(default_factory=SelectiveSearchConfig)
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.balance < 0 or self.penalty < 0:
            raise ConfigError(f"retrieval: balance={self.balance} and penalty={self.penalty} must be >= 0")
        if self.contour_size < 1 or self.contour_size % 2 == 0:
            raise ConfigError(f"retrieval.contour_size={self.contour_size} must be an odd number >= 1")
        if self.proposal_count is not None and self.proposal_count < 1:
            raise ConfigError(f"retrieval.proposal_count={self.proposal_count} must be >= 1 or null (all)")

    def proposal_source(self) -> Hashable:
        return ("selective_search", self.search, self.cache_dir, self.proposal_count)

    def make_proposals(self, image: np.ndarray) -> np.ndarray:
        return proposal_masks(image, self.search, self.cache_dir, limit=self.proposal_count)


@dataclass(frozen=True, eq=False)
class ProposalTerms:
    """The parts of PRM's proposal score for K peaks x P proposals, plus each proposal's area in pixels."""

    inside: Tensor  # (K, P) sum(PRM_k[S])
    contour: Tensor  # (K, P) sum(PRM_k[contour(S)])
    background: Tensor  # (K, P) |S & BG_c(k)|
    area: Tensor  # (P,) |S|

    def score(self, balance: float, penalty: float) -> Tensor:
        """(K, P) PRM's retrieval score R(k, S)."""
        return balance * self.inside + self.contour - penalty * self.background


def proposal_terms(prms: Tensor, proposals: Tensor, bg: Tensor, contour_size: int = 5) -> ProposalTerms:
    """Score terms by matmuls over flattened masks, chunked over proposals to bound memory.

    prms (K, H, W) float; proposals (P, H, W) bool; bg (K, H, W) bool, the BG map of each peak's class.
    """
    k, h, w = prms.shape
    p = len(proposals)
    # One left operand [PRMs; BG maps; ones] gives the instance term, the BG count and the area in one matmul:
    # on the CPU the cost is reading the (chunk, HW) mask matrix, so it is read once, not three times.
    flat_prm = prms.reshape(k, -1).float()
    left = torch.cat([flat_prm, bg.reshape(k, -1).float(), flat_prm.new_ones(1, h * w)])
    per_mask = flat_prm.new_zeros(2 * k + 1, p)
    contour = flat_prm.new_zeros(k, p)
    step = max(1, _CHUNK_ELEMENTS // max(1, h * w))
    for s in range(0, p, step):
        chunk = proposals[s : s + step]
        per_mask[:, s : s + step] = left @ chunk.reshape(len(chunk), -1).float().T
        contour[:, s : s + step] = flat_prm @ contour_masks(chunk, contour_size).reshape(len(chunk), -1).float().T
    return ProposalTerms(per_mask[:k], contour, per_mask[k : 2 * k], per_mask[2 * k])


def _proposals_of(cfg: ProposalRetrievalConfig, inputs: RetrievalInputs) -> Tensor:
    """(P, H, W) bool: the caller's proposals, else selective search on the image; the first proposal_count."""
    h, w = inputs.image_size
    if inputs.proposals is not None:
        proposals = inputs.proposals
    else:
        if inputs.image is None:
            raise ConfigError("retrieval.name=proposals needs the original RGB image (or precomputed proposals)")
        if tuple(inputs.image.shape[:2]) != (h, w):
            raise ValueError(f"image is {tuple(inputs.image.shape[:2])}, the maps are {(h, w)}")
        proposals = cfg.make_proposals(inputs.image)
    if isinstance(proposals, np.ndarray):
        proposals = torch.from_numpy(np.ascontiguousarray(proposals))
    proposals = proposals.to(device=inputs.prms.device, dtype=torch.bool)
    if proposals.ndim != 3 or tuple(proposals.shape[1:]) != (h, w):
        raise ValueError(f"proposals must be (P, {h}, {w}) masks, got {tuple(proposals.shape)}")
    return proposals if cfg.proposal_count is None else proposals[: cfg.proposal_count]


@register_method("proposals", config=ProposalRetrievalConfig)
def proposal_candidates(cfg: ProposalRetrievalConfig, inputs: RetrievalInputs) -> Candidates:
    """Each peak's best proposal by PRM's score on sum-normalised PRMs (module docstring)."""
    proposals = _proposals_of(cfg, inputs)
    k, h, w = inputs.prms.shape
    if len(proposals) == 0:
        none = torch.zeros(k, dtype=torch.bool, device=inputs.prms.device)
        return Candidates(none, torch.zeros(k, h, w, dtype=torch.bool, device=inputs.prms.device))
    terms = proposal_terms(inputs.sum_normalised_prms(), proposals, inputs.background, cfg.contour_size)
    usable = size_ok(terms.area, h * w, cfg.min_area, cfg.max_area)
    score = terms.score(cfg.balance, cfg.penalty).masked_fill(~usable[None, :], float("-inf"))
    value, pick = score.max(dim=1)
    return Candidates(torch.isfinite(value), proposals[pick], values=value)
