"""Pure functions the evaluators share: mask IoU, VOC all-point AP over a ranking, ranking order.

Torch only; no state, no Lightning, no Hydra.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix (M, N) float64 of boolean masks a (M, H, W) and b (N, H, W); 0 where the union is empty.

    The pixel counts come from one matmul of the flattened masks: they are sums of 0/1 products, exact in float32
    up to 2^24 pixels per mask (far above any VOC image), whatever order the BLAS adds them in. The ratio is taken
    in float64, so it is the exact quotient rounded once.
    """
    fa, fb = a.flatten(1).float(), b.flatten(1).float()
    inter = (fa @ fb.T).double()
    union = fa.sum(1, dtype=torch.float64)[:, None] + fb.sum(1, dtype=torch.float64)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def ranking(scores: Tensor) -> Tensor:
    """Indices that sort `scores` (N,) from high to low; equal scores keep their given order (a stable sort)."""
    return torch.sort(scores, descending=True, stable=True).indices


def voc_average_precision(is_tp: Tensor, num_positives: int) -> float:
    """VOC all-point AP (VOC 2010 and later, chainercv's `calc_detection_voc_ap` with use_07_metric=False).

    is_tp: (N,) bool, the ranked detections (best first): True for a true positive, False for a false positive.
    num_positives: the number of ground-truth objects; must be > 0 (AP is undefined without any).

    Precision and recall after each detection; the precision is made monotone (each point takes the maximum
    precision at any higher recall), with sentinels (recall 0, precision 0) in front and (recall 1, precision 0)
    at the end; AP is the sum of (recall step) x (envelope precision) over the points where recall changes.
    No detection gives 0.
    """
    if num_positives <= 0:
        raise ValueError("voc_average_precision: AP is undefined without a positive")
    tp = torch.cumsum(is_tp.to(torch.float64), 0)
    fp = torch.cumsum((~is_tp.bool()).to(torch.float64), 0)
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    recall = torch.cat([zero, tp / num_positives, one])
    precision = torch.cat([zero, tp / (tp + fp).clamp_min(1), zero])
    envelope = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])
    steps = (recall[1:] != recall[:-1]).nonzero(as_tuple=True)[0]
    return float(((recall[steps + 1] - recall[steps]) * envelope[steps + 1]).sum())
