"""What every retrieval method shares: the background map, contours, the confidence score and NMS.

Background map BG_c (`background_masks`), from the raw class response map CRM_c (h, w) and the image size:
    - `official` (PRM's `instance_seg`): `imresize(CRM_c, (H, W), interp='bicubic')` with scipy's imresize, which
      first bytescales the float map to uint8 (`(v - min) * 255 / (max - min) + 0.5`, truncated; a constant map
      becomes 0) and then resizes that 8-bit image with PIL's bicubic filter; BG_c = resized < bg_factor *
      mean(resized). Up to the rounding and the resize, the cut is `min + bg_factor * (mean - min)` of the raw
      map, not `bg_factor * mean`: for logits, which are often all negative, the two differ.
    - `bilinear` (ours, ranprm's first rule, kept for `prm_only`): the raw CRM resized bilinearly
      (align_corners=False); BG_c = resized < bg_factor * mean(resized).

Confidence score (ours: the official code ranks nothing, so its mAP is undefined). For an instance with mask S
from peak k of class c:

    score = sigmoid(logit_c) * strength_k * mass_k * foreground_k                      in [0, 1]

    strength_k   = softplus(v_k) / max_{j: class_j = c} softplus(v_j)    (v: raw CRM value at a peak)
    mass_k       = sum(PRM_k[S]) / sum(PRM_k)
    foreground_k = 1 - |S & BG_c| / |S|

Why: each factor measures, in [0, 1], one independent way an instance goes wrong, and none depends on the image
size or the PRM's scale, so scores compare across a dataset.
- sigmoid(logit_c): the image-level probability of the class (the classifier is trained with a sigmoid loss); a
  doubtful class ranks its instances low.
- strength_k: the peak relative to the strongest peak of its class in the image. The dominant peak gets 1; weaker
  secondary peaks, often parts or duplicates, are discounted in proportion. softplus keeps the ratio monotone and
  defined for CRM values <= 0, and ~ the plain ratio for large positive values.
- mass_k: how much of the peak's own evidence the mask explains; a mask that misses the response, or a response
  scattered over the image, scores low.
- foreground_k: how much of the mask the class response map calls object; a mask leaking into background scores
  low.
The product is 0 as soon as one check fails entirely.

NMS (PRM's official `instance_nms`): instances are visited by `nms_order`: ranprm's score, highest first (ours,
the only choice for prm_only), or the method's own retrieval value (the official order, `proposals`' default).
Each kept instance suppresses the later ones whose mask IoU with it is >= nms_iou (class-agnostic as in the
official code; `nms_per_class` restricts it to one class) and absorbs their PRMs (`nms_merge`): whole (official),
masked (PRM_suppressed * mask_suppressed), or none; the merged maps are re-normalised to a maximum of 1 for display.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


# ---------------------------------------------------------------------------------------------- background
def bytescale(crm: np.ndarray) -> np.ndarray:
    """scipy's `bytescale` (what `scipy.misc.imresize` applied to a float map first): (h, w) float -> uint8.

    In float32 as scipy did on a float32 map under NumPy 1's casting: the scale is cast to the array's dtype.
    """
    data = np.asarray(crm, dtype=np.float32)
    low = data.min()
    span = float(data.max() - low)
    scale = np.float32(255.0 / (span if span != 0 else 1.0))
    scaled = (data - low) * scale
    return (scaled.clip(0, 255) + np.float32(0.5)).astype(np.uint8)


def official_background(crm: np.ndarray, size: tuple[int, int], bg_factor: float) -> np.ndarray:
    """PRM's BG map (H, W) bool of one raw CRM (h, w): bytescale, PIL bicubic resize, `< bg_factor * mean`."""
    height, width = size
    resized = np.asarray(Image.fromarray(bytescale(crm), mode="L").resize((width, height), Image.BICUBIC))
    return resized < bg_factor * resized.mean()


def background_masks(
    crms: Tensor, classes: Tensor, size: tuple[int, int], bg_factor: float = 0.95, rule: str = "official"
) -> Tensor:
    """BG maps (K, H, W) bool of the classes `classes` (K,) long, from raw CRMs (C, h, w), at the image `size`.

    One map per distinct class, computed once; see the module docstring for the two rules.
    """
    h, w = int(size[0]), int(size[1])
    if len(classes) == 0:
        return torch.zeros(0, h, w, dtype=torch.bool, device=crms.device)
    unique, inverse = torch.unique(classes, return_inverse=True)
    maps = crms[unique].float()
    if rule == "official":
        cpu = maps.detach().cpu().numpy()
        bg = torch.from_numpy(np.stack([official_background(m, (h, w), bg_factor) for m in cpu])).to(crms.device)
    elif rule == "bilinear":
        if tuple(maps.shape[-2:]) != (h, w):
            maps = F.interpolate(maps[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        bg = maps < bg_factor * maps.mean(dim=(1, 2), keepdim=True)
    else:
        raise ValueError(f"unknown background rule {rule!r}; use official or bilinear")
    return bg[inverse]


# ---------------------------------------------------------------------------------------------- contours
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


# ------------------------------------------------------------------------------------------ confidence
def size_ok(area: Tensor, image_area: int, min_area: float, max_area: float | None) -> Tensor:
    """Bool: areas (in pixels) within [min_area, max_area) of the image area (PRM's proposal size limit)."""
    ok = area >= min_area * image_area
    if max_area is not None:
        ok &= area < max_area * image_area
    return ok


def peak_strength(labels: Tensor, peak_values: Tensor) -> Tensor:
    """(K,) in (0, 1]: softplus(v_k) / max softplus(v_j) over the peaks j of the same class."""
    strength = F.softplus(peak_values.float())
    best = torch.zeros(int(labels.max()) + 1, device=strength.device).scatter_reduce(
        0, labels, strength, reduce="amax", include_self=False
    )
    return strength / best[labels].clamp_min(1e-30)


def mass_and_foreground(prms: Tensor, masks: Tensor, background: Tensor) -> tuple[Tensor, Tensor]:
    """Per instance, the share of its PRM inside its mask and the share of its mask off the background.

    prms (K, H, W) float, masks (K, H, W) bool, background (K, H, W) bool. Returns (mass (K,), foreground (K,)).
    """
    k = len(prms)
    flat = masks.reshape(k, -1).float()
    flat_prms = prms.reshape(k, -1).float()
    mass = (flat_prms * flat).sum(1) / flat_prms.sum(1).clamp_min(1e-12)
    bg_count = (background.reshape(k, -1).float() * flat).sum(1)
    foreground = 1.0 - bg_count / flat.sum(1).clamp_min(1.0)
    return mass, foreground


def confidence_scores(
    class_logits: Tensor, labels: Tensor, strength: Tensor, mass: Tensor, foreground: Tensor
) -> Tensor:
    """(N,) in [0, 1]: sigmoid(logit_c) * strength * mass * foreground (module docstring).

    class_logits (C,); labels, strength, mass, foreground (N,).
    """
    prob = torch.sigmoid(class_logits.float())[labels]
    return (prob * strength * mass.clamp(0, 1) * foreground.clamp(0, 1)).clamp(0, 1)


# ------------------------------------------------------------------------------------------------- NMS
def instance_nms(
    masks: Tensor,
    prms: Tensor,
    scores: Tensor,
    labels: Tensor,
    iou_threshold: float = 0.3,
    per_class: bool = False,
    merge: str = "masked",
) -> tuple[Tensor, Tensor]:
    """Greedy mask NMS that merges suppressed PRMs into the instance that suppressed them.

    masks (N, H, W) bool, prms (N, H, W) float, scores (N,) the visiting order (highest first), labels (N,);
    merge: whole | masked | none.
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
    # kept instance owns itself), C_j = PRM_j for kept instances and the absorbed part of PRM_j for the others.
    kept = alive.nonzero(as_tuple=True)[0]
    assign = torch.zeros(len(kept), n)
    assign[torch.searchsorted(kept, owner), torch.arange(n)] = 1.0
    alive_dev = alive.to(flat.device)[:, None]
    absorbed = {"whole": torch.ones_like(flat), "masked": flat, "none": torch.zeros_like(flat)}[merge]
    contribution = prms[order].reshape(n, -1).float() * torch.where(alive_dev, 1.0, absorbed)
    merged = (assign.to(flat.device) @ contribution).reshape(len(kept), *prms.shape[1:])
    kept = kept.to(scores.device)
    merged = merged / merged.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return order[kept], merged.clamp(0, 1)
