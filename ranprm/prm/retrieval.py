"""Instance retrieval: from the peak response maps (PRMs) of one image to scored instance masks.

Inputs per image, K valid peaks (see `retrieve_instances`): PRMs normalised to [0, 1] at the image size, the
peaks' image coordinates, classes and raw CRM values, the image's class logits, and the class response maps
(CRMs) up-sampled to the image size. Output: `ranprm.prm.instances.Instances`, sorted by score, highest first.

Background map (both methods)
    BG_c = CRM_c < bg_factor * mean(CRM_c), CRM_c at the image size (PRM's official rule, bg_factor 0.95).

`proposals` (PRM, Zhou et al. 2018; docs/method.md "Instance retrieval")
    Segment proposals S come from selective search (`ranprm.prm.proposals`) or the caller. Peak k, class c:

        R(k, S) = balance * sum(PRM_k[S]) + sum(PRM_k[contour(S)]) - penalty * sum(BG_c[S])

    contour(S) is the morphological gradient with a contour_size x contour_size square, exactly
    `cv2.morphologyEx(S, MORPH_GRADIENT, ones)` (the image border neither dilates nor erodes), computed for
    all proposals at once by separable max-pooling. Proposals covering >= max_area or < min_area of the image
    are skipped. Each term is one matmul over flattened masks, (K, HW) @ (HW, P). Each peak keeps its best
    proposal (the first on ties); a peak whose proposals are all skipped yields no instance.
    Cost: ~0.75 s for ~600 proposals x 5 peaks at 500x375 on one CPU thread (memory-bound matmuls).

`prm_only` (ours, proposal-free)
    1. Smooth the PRM with a Gaussian of sigma = smooth * min(H, W) pixels (PRMs are speckled at pixel
       level; 0 turns it off) and re-normalise it to a maximum of 1.
    2. Foreground = smoothed PRM >= threshold; with `gate`, also not BG_c (the class map must agree).
    3. Keep the 8-connected component (cv2.connectedComponents) holding the peak pixel (the peak rounded to
       the nearest pixel). When the peak pixel is not foreground, keep the component of the foreground pixel
       nearest to it (Euclidean; the first in raster order on ties), so a peak sitting just off its response
       still gets its region. No foreground at all, or a component outside [min_area, max_area) of the image,
       yields no instance.

NMS (both methods; PRM's official `instance_nms`)
    Instances are visited by score, highest first. Each kept instance suppresses the later ones whose mask IoU
    with it is >= nms_iou (class-agnostic as in the official code; `nms_per_class` restricts it to one class)
    and absorbs their PRMs: PRM_kept += PRM_suppressed * mask_suppressed, re-normalised to a maximum of 1.

Confidence score (ours: the official code ranks nothing, so its mAP is undefined)
    For an instance with mask S from peak k of class c:

        score = sigmoid(logit_c) * strength_k * mass_k * foreground_k                      in [0, 1]

        strength_k   = softplus(v_k) / max_{j: class_j = c} softplus(v_j)    (v: raw CRM value at a peak)
        mass_k       = sum(PRM_k[S]) / sum(PRM_k)
        foreground_k = 1 - |S & BG_c| / |S|

    Why: each factor measures, in [0, 1], one independent way an instance goes wrong, and none depends on the
    image size or the PRM's scale, so scores compare across a dataset.
    - sigmoid(logit_c): the image-level probability of the class (the classifier is trained with a sigmoid
      loss); a doubtful class ranks its instances low.
    - strength_k: the peak relative to the strongest peak of its class in the image. The dominant peak gets 1;
      weaker secondary peaks, often parts or duplicates, are discounted in proportion. softplus keeps the
      ratio monotone and defined for CRM values <= 0, and ~ the plain ratio for large positive values.
    - mass_k: how much of the peak's own evidence the mask explains; a mask that misses the response, or a
      response scattered over the image, scores low.
    - foreground_k: how much of the mask the class response map calls object; a mask leaking into background
      scores low.
    The product is 0 as soon as one check fails entirely. NMS visits instances in this order.

Everything here is pure torch/numpy/OpenCV and runs on the PRMs' device (connected components on the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ranprm.errors import ConfigError
from ranprm.prm.instances import Instances
from ranprm.prm.proposals import ProposalConfig, proposal_masks

# Max elements of one (proposals x pixels) float chunk in proposal scoring: 2^24 floats, 64 MiB a temporary.
_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------- configs
def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"retrieval.{key}={value!r} must be true or false")


def _to_float_or_none(key: str, value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"retrieval.{key}={value!r} must be a number") from err


def _parse(cls: type, cfg: Mapping[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Typed keyword arguments for the dataclass `cls` from a flat mapping; unknown keys raise ConfigError."""
    cfg = dict(cfg)
    name = cfg.pop("name", cls.name)
    if name != cls.name:
        raise ConfigError(f"retrieval.name={name!r} does not match {cls.__name__} (name {cls.name!r})")
    types = {f.name: f.type for f in fields(cls) if f.name not in skip}
    unknown = sorted(set(cfg) - set(types) - set(skip))
    if unknown:
        raise ConfigError(f"retrieval (name={cls.name}): unknown option(s) {unknown}; known: {sorted(types)}")
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key in skip:
            continue
        kind = str(types[key])
        if kind == "bool":
            out[key] = _to_bool(key, value)
        elif kind == "int":
            try:
                out[key] = int(value)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"retrieval.{key}={value!r} must be an integer") from err
        elif kind.startswith("float"):
            out[key] = _to_float_or_none(key, value)
        else:
            out[key] = value
        if out[key] is None and "None" not in kind:
            raise ConfigError(f"retrieval.{key} must not be null")
    return out


def _check_common(bg_factor: float, min_area: float, max_area: float | None, nms_iou: float) -> None:
    if not math.isfinite(bg_factor):
        raise ConfigError(f"retrieval.bg_factor={bg_factor} must be a finite number")
    if not 0.0 <= min_area < 1.0:
        raise ConfigError(f"retrieval.min_area={min_area} must lie in [0, 1)")
    if max_area is not None and not min_area < max_area <= 1.0:
        raise ConfigError(f"retrieval.max_area={max_area} must lie in (min_area, 1] or be null")
    if not 0.0 < nms_iou <= 1.0:
        raise ConfigError(f"retrieval.nms_iou={nms_iou} must lie in (0, 1]")


@dataclass(frozen=True)
class ProposalRetrievalConfig:
    """`retrieval: proposals`: PRM's proposal score (module docstring) over selective-search proposals."""

    name: ClassVar[str] = "proposals"
    balance: float = 0.8
    penalty: float = 1e-5
    bg_factor: float = 0.95
    contour_size: int = 5
    min_area: float = 2e-5
    max_area: float = 0.85
    nms_iou: float = 0.3
    nms_per_class: bool = False
    search: ProposalConfig = field(default_factory=ProposalConfig)

    def __post_init__(self) -> None:
        _check_common(self.bg_factor, self.min_area, self.max_area, self.nms_iou)
        if self.balance < 0 or self.penalty < 0:
            raise ConfigError(f"retrieval: balance={self.balance} and penalty={self.penalty} must be >= 0")
        if self.contour_size < 1 or self.contour_size % 2 == 0:
            raise ConfigError(f"retrieval.contour_size={self.contour_size} must be an odd number >= 1")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ProposalRetrievalConfig:
        """From the `retrieval` config: flat scoring options, a `search` mapping, a top-level `cache_dir`."""
        cfg = dict(cfg)
        search = dict(cfg.get("search") or {})
        if "cache_dir" in search:
            raise ConfigError("retrieval.search.cache_dir: put cache_dir at retrieval.cache_dir")
        search["cache_dir"] = cfg.get("cache_dir")
        return cls(**_parse(cls, cfg, skip=("search", "cache_dir")), search=ProposalConfig.from_config(search))


@dataclass(frozen=True)
class PrmOnlyConfig:
    """`retrieval: prm_only`: threshold the PRM, gate by the CRM, keep the peak's component (see module)."""

    name: ClassVar[str] = "prm_only"
    threshold: float = 0.2
    smooth: float = 0.01
    gate: bool = True
    bg_factor: float = 0.95
    min_area: float = 2e-5
    max_area: float | None = None
    nms_iou: float = 0.3
    nms_per_class: bool = False

    def __post_init__(self) -> None:
        _check_common(self.bg_factor, self.min_area, self.max_area, self.nms_iou)
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"retrieval.threshold={self.threshold} must lie in (0, 1]")
        if not 0.0 <= self.smooth <= 0.5:
            raise ConfigError(f"retrieval.smooth={self.smooth} must lie in [0, 0.5] (a fraction of the shorter side)")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PrmOnlyConfig:
        return cls(**_parse(cls, cfg))


RetrievalConfig = ProposalRetrievalConfig | PrmOnlyConfig
_METHODS: dict[str, type[ProposalRetrievalConfig] | type[PrmOnlyConfig]] = {
    "proposals": ProposalRetrievalConfig,
    "prm_only": PrmOnlyConfig,
}


def build_retrieval_config(cfg: Mapping[str, Any] | RetrievalConfig | None) -> RetrievalConfig:
    """The method config from the `retrieval` group (a mapping with `name`); None means prm_only defaults."""
    if cfg is None:
        return PrmOnlyConfig()
    if isinstance(cfg, ProposalRetrievalConfig | PrmOnlyConfig):
        return cfg
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"retrieval must be a mapping with a name, got {type(cfg).__name__}")
    name = cfg.get("name")
    if name not in _METHODS:
        raise ConfigError(f"retrieval.name={name!r} is unknown; choose {' or '.join(_METHODS)}")
    return _METHODS[name].from_config(cfg)


# --------------------------------------------------------------------------------------- shared pieces
def background_masks(crms: Tensor, bg_factor: float = 0.95) -> Tensor:
    """BG maps (C, H, W) bool: CRM_c < bg_factor * mean(CRM_c), from CRMs (C, H, W) at the image size."""
    crms = crms.float()
    return crms < bg_factor * crms.mean(dim=(1, 2), keepdim=True)


def contour_masks(masks: Tensor, size: int = 5) -> Tensor:
    """Morphological gradient (P, H, W) bool of masks (P, H, W) bool with a size x size square.

    Equals cv2.morphologyEx(mask, MORPH_GRADIENT, np.ones((size, size))) with OpenCV's default border (the
    border neither dilates nor erodes a mask). On the CPU it is that call, once per mask: OpenCV's SIMD
    morphology is ~20x faster there than pooling. On other devices: `contour_masks_pooled`.
    """
    if len(masks) == 0 or masks.device.type != "cpu":
        return contour_masks_pooled(masks, size)
    src = masks.contiguous().numpy().view(np.uint8)
    out = np.empty_like(src)
    kernel = np.ones((size, size), np.uint8)
    for i in range(len(src)):  # one C call per proposal; the pixel work is OpenCV's
        out[i] = cv2.morphologyEx(src[i], cv2.MORPH_GRADIENT, kernel)
    return torch.from_numpy(out.view(bool))


def contour_masks_pooled(masks: Tensor, size: int = 5) -> Tensor:
    """`contour_masks` by separable max-pooling, for any device.

    Max-pooling pads with -inf, so the border never dilates a mask, and never erodes it either (erosion is
    -maxpool(-x)): the same border rule as OpenCV's. A square is separable: two 1-D poolings.
    """
    if len(masks) == 0:
        return masks.clone()
    pad = size // 2
    x = masks[:, None].float()

    def dilate(t: Tensor) -> Tensor:
        t = F.max_pool2d(t, (1, size), stride=1, padding=(0, pad))
        return F.max_pool2d(t, (size, 1), stride=1, padding=(pad, 0))

    return (dilate(x) + dilate(-x))[:, 0] > 0  # dilation - erosion, erosion = -dilate(-x)


def peak_strength(labels: Tensor, peak_values: Tensor) -> Tensor:
    """(K,) in (0, 1]: softplus(v_k) / max softplus(v_j) over the peaks j of the same class."""
    strength = F.softplus(peak_values.float())
    best = torch.zeros(int(labels.max()) + 1, device=strength.device).scatter_reduce(
        0, labels, strength, reduce="amax", include_self=False
    )
    return strength / best[labels].clamp_min(1e-30)


def confidence_scores(
    class_logits: Tensor, labels: Tensor, strength: Tensor, mass: Tensor, foreground: Tensor
) -> Tensor:
    """(N,) in [0, 1]: sigmoid(logit_c) * strength * mass * foreground (module docstring).

    class_logits (C,); labels, strength, mass, foreground (N,).
    """
    prob = torch.sigmoid(class_logits.float())[labels]
    return (prob * strength * mass.clamp(0, 1) * foreground.clamp(0, 1)).clamp(0, 1)


def instance_nms(
    masks: Tensor,
    prms: Tensor,
    scores: Tensor,
    labels: Tensor,
    iou_threshold: float = 0.3,
    per_class: bool = False,
) -> tuple[Tensor, Tensor]:
    """Greedy mask NMS that merges suppressed PRMs into the instance that suppressed them.

    masks (N, H, W) bool, prms (N, H, W) float, scores (N,), labels (N,).
    Returns `(keep (M,) long indices into the inputs, highest score first; merged PRMs (M, H, W) in [0, 1])`.
    """
    n = len(scores)
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device), prms[:0].float()
    order = torch.sort(scores, descending=True, stable=True).indices
    flat = masks[order].reshape(n, -1).float()
    inter = flat @ flat.T
    area = flat.sum(1)
    iou = inter / (area[:, None] + area[None, :] - inter + 1e-10)
    if per_class:
        same = labels[order][:, None] == labels[order][None, :]
        iou = torch.where(same, iou, torch.zeros_like(iou))
    suppress = (iou >= iou_threshold).cpu()
    alive = torch.ones(n, dtype=torch.bool)
    owner = torch.arange(n)
    later = torch.arange(n)
    for i in range(n):  # N instances, not pixels: the greedy order is inherently sequential
        if not alive[i]:
            continue
        hit = alive & suppress[i] & (later > i)
        alive &= ~hit
        owner[hit] = i
    # Merging as one matmul: merged = A @ C with A[i, j] = 1 when instance j ends in kept instance i (every
    # kept instance owns itself), C_j = PRM_j for kept instances and PRM_j * mask_j for absorbed ones.
    kept = alive.nonzero(as_tuple=True)[0]
    assign = torch.zeros(len(kept), n)
    assign[torch.searchsorted(kept, owner), torch.arange(n)] = 1.0
    contribution = prms[order].reshape(n, -1).float() * torch.where(alive.to(flat.device)[:, None], 1.0, flat)
    merged = (assign.to(flat.device) @ contribution).reshape(len(kept), *prms.shape[1:])
    kept = kept.to(scores.device)
    merged = merged / merged.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return order[kept], merged.clamp(0, 1)


# ------------------------------------------------------------------------------------ proposals method
@dataclass
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


def _size_ok(area: Tensor, image_area: int, min_area: float, max_area: float | None) -> Tensor:
    ok = area >= min_area * image_area
    if max_area is not None:
        ok &= area < max_area * image_area
    return ok


def select_proposals(
    cfg: ProposalRetrievalConfig, prms: Tensor, labels: Tensor, bg: Tensor, proposals: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Best proposal per peak.

    prms (K, H, W), labels (K,), bg (C, H, W) bool, proposals (P, H, W) bool.
    Returns `(found (K,) bool, best (K,) long index into proposals, mass (K,), foreground (K,))`; the last
    three are meaningful where found.
    """
    k, h, w = prms.shape
    terms = proposal_terms(prms, proposals, bg[labels], cfg.contour_size)
    usable = _size_ok(terms.area, h * w, cfg.min_area, cfg.max_area)
    score = terms.score(cfg.balance, cfg.penalty).masked_fill(~usable[None, :], float("-inf"))
    if score.shape[1] == 0:
        score = score.new_full((k, 1), float("-inf"))
    value, pick = score.max(dim=1)
    found = torch.isfinite(value)
    pick = torch.where(found, pick, torch.zeros_like(pick))
    if len(proposals) == 0:
        zeros = prms.new_zeros(k)
        return found, pick, zeros, zeros
    rows = torch.arange(k, device=prms.device)
    total = prms.reshape(k, -1).float().sum(1)
    mass = terms.inside[rows, pick] / total.clamp_min(1e-12)
    foreground = 1.0 - terms.background[rows, pick] / terms.area[pick].clamp_min(1.0)
    return found, pick, mass, foreground


def _as_bool_tensor(proposals: np.ndarray | Tensor, device: torch.device) -> Tensor:
    if isinstance(proposals, np.ndarray):
        proposals = torch.from_numpy(np.ascontiguousarray(proposals))
    return proposals.to(device=device, dtype=torch.bool)


# ------------------------------------------------------------------------------------- prm_only method
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

    Returns a (H, W) bool mask, or None when the mask is empty (module docstring, prm_only step 3).
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


def prm_only_masks(
    cfg: PrmOnlyConfig, prms: Tensor, peaks_yx: Tensor, labels: Tensor, bg: Tensor
) -> tuple[Tensor, Tensor]:
    """Proposal-free masks. prms (K, H, W), peaks_yx (K, 2), labels (K,), bg (C, H, W) bool.

    Returns `(found (K,) bool, masks (K, H, W) bool)`; masks are empty where not found.
    """
    k, h, w = prms.shape
    smooth = gaussian_blur(prms.float(), cfg.smooth * min(h, w))
    smooth = smooth / smooth.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    fg = smooth >= cfg.threshold
    if cfg.gate:
        fg &= ~bg[labels]
    fg_np = fg.cpu().numpy()
    peaks = peaks_yx.detach().cpu().round().long()
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
    found_t &= _size_ok(masks_t.flatten(1).sum(1).float(), h * w, cfg.min_area, cfg.max_area)
    return found_t, masks_t


# ----------------------------------------------------------------------------------------------- entry
def _check_inputs(
    prms: Tensor, peaks_yx: Tensor, labels: Tensor, peak_values: Tensor, class_logits: Tensor, crms: Tensor
) -> None:
    if crms.ndim != 3 or class_logits.shape != crms.shape[:1]:
        raise ValueError(
            f"crms must be (C, H, W) and class_logits (C,), got {tuple(crms.shape)}, {tuple(class_logits.shape)}"
        )
    k = len(prms)
    if prms.ndim != 3 or prms.shape[1:] != crms.shape[1:]:
        raise ValueError(f"prms must be (K, H, W) at the CRMs' size {tuple(crms.shape[1:])}, got {tuple(prms.shape)}")
    if peaks_yx.shape != (k, 2) or labels.shape != (k,) or peak_values.shape != (k,):
        raise ValueError(
            f"peaks_yx (K, 2), labels (K,), peak_values (K,) with K={k}, got "
            f"{tuple(peaks_yx.shape)}, {tuple(labels.shape)}, {tuple(peak_values.shape)}"
        )
    if k and (int(labels.min()) < 0 or int(labels.max()) >= len(class_logits)):
        raise ValueError(f"labels must lie in [0, {len(class_logits)})")


@torch.no_grad()
def retrieve_instances(
    method_cfg: Mapping[str, Any] | RetrievalConfig | None,
    prms: Tensor,
    peaks_yx: Tensor,
    labels: Tensor,
    peak_values: Tensor,
    class_logits: Tensor,
    crms: Tensor,
    image: np.ndarray | None = None,
    proposals: np.ndarray | Tensor | None = None,
) -> Instances:
    """Instances of one image from its K valid peaks.

    method_cfg:  the `retrieval` config (mapping with `name`) or a config dataclass; None: prm_only defaults
    prms:        (K, H, W) float, each normalised to [0, 1], at the image size
    peaks_yx:    (K, 2) float (y, x) image pixel coordinates
    labels:      (K,) long 0-based classes
    peak_values: (K,) raw CRM values at the peaks
    class_logits:(C,) the image's class scores
    crms:        (C, H, W) class response maps up-sampled to the image size
    image:       (H, W, 3) uint8 RGB, for selective search when `proposals` is not given (proposals method)
    proposals:   (P, H, W) bool segment proposals, overriding selective search
    Returns Instances on prms' device, highest score first; K = 0 gives Instances.empty.
    """
    cfg = build_retrieval_config(method_cfg)
    _check_inputs(prms, peaks_yx, labels, peak_values, class_logits, crms)
    h, w = crms.shape[1:]
    device = prms.device
    if len(prms) == 0:
        return Instances.empty((h, w), device=device)
    labels = labels.to(device=device, dtype=torch.long)
    bg = background_masks(crms.to(device), cfg.bg_factor)
    if isinstance(cfg, ProposalRetrievalConfig):
        if proposals is None:
            if image is None:
                raise ConfigError("retrieval.name=proposals needs the original RGB image (or precomputed proposals)")
            if tuple(image.shape[:2]) != (h, w):
                raise ValueError(f"image is {tuple(image.shape[:2])}, the maps are {(h, w)}")
            proposals = proposal_masks(image, cfg.search)
        props = _as_bool_tensor(proposals, device)
        if props.ndim != 3 or tuple(props.shape[1:]) != (h, w):
            raise ValueError(f"proposals must be (P, {h}, {w}) masks, got {tuple(props.shape)}")
        found, best, mass, foreground = select_proposals(cfg, prms, labels, bg, props)
        masks = props[best]
    else:
        found, masks = prm_only_masks(cfg, prms, peaks_yx, labels, bg)
        flat = masks.reshape(len(masks), -1).float()
        total = prms.reshape(len(prms), -1).float().sum(1)
        mass = (prms.reshape(len(prms), -1).float() * flat).sum(1) / total.clamp_min(1e-12)
        bg_count = (bg[labels].reshape(len(prms), -1).float() * flat).sum(1)
        foreground = 1.0 - bg_count / flat.sum(1).clamp_min(1.0)
    scores = confidence_scores(
        class_logits.to(device), labels, peak_strength(labels, peak_values.to(device)), mass, foreground
    )
    rows = found.nonzero(as_tuple=True)[0]
    if len(rows) == 0:
        return Instances.empty((h, w), device=device)
    keep, merged = instance_nms(masks[rows], prms[rows], scores[rows], labels[rows], cfg.nms_iou, cfg.nms_per_class)
    rows = rows[keep]
    return Instances(
        image_size=(h, w),
        masks=masks[rows],
        labels=labels[rows],
        scores=scores[rows].float(),
        peaks=peaks_yx.to(device)[rows].float(),
        prms=merged,
    )
