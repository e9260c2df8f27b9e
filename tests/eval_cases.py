"""Seeded random evaluation cases shared by the metric tests (masks, labels, scores, void bands)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Case:
    """One image: ground truth (void already marked) and predictions, at size (H, W)."""

    image_id: str
    gt_masks: torch.Tensor  # (M, H, W) bool
    gt_labels: torch.Tensor  # (M,) long
    void: torch.Tensor  # (H, W) bool
    pred_masks: torch.Tensor  # (N, H, W) bool
    pred_labels: torch.Tensor  # (N,) long
    pred_scores: torch.Tensor  # (N,) float64, distinct over the whole set


def _rect(g: torch.Generator, h: int, w: int) -> torch.Tensor:
    y0, x0 = int(torch.randint(0, h - 3, (1,), generator=g)), int(torch.randint(0, w - 3, (1,), generator=g))
    y1 = y0 + 3 + int(torch.randint(0, h - y0 - 2, (1,), generator=g))
    x1 = x0 + 3 + int(torch.randint(0, w - x0 - 2, (1,), generator=g))
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def _ring(m: torch.Tensor) -> torch.Tensor:
    """The 1-px band just outside mask m (4-neighbourhood), as VOC draws void around objects."""
    grown = m.clone()
    grown[1:] |= m[:-1]
    grown[:-1] |= m[1:]
    grown[:, 1:] |= m[:, :-1]
    grown[:, :-1] |= m[:, 1:]
    return grown & ~m


def random_cases(seed: int, num_images: int = 8, size: tuple[int, int] = (24, 20), num_classes: int = 3) -> list[Case]:
    """Images with 0-3 GT rectangles wrapped in void bands and 0-5 predictions: jittered GT copies (some spilling
    into the void band, some duplicated) and random boxes, with distinct scores."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    cases = []
    for i in range(num_images):
        m = int(torch.randint(0, 4, (1,), generator=g))
        gt_masks = [_rect(g, h, w) for _ in range(m)]
        gt_labels = torch.randint(0, num_classes, (m,), generator=g)
        void = torch.zeros(h, w, dtype=torch.bool)
        for mask in gt_masks:
            void |= _ring(mask)
        for mask in gt_masks:
            void &= ~mask
        n = int(torch.randint(0, 6, (1,), generator=g))
        pred_masks, pred_labels = [], []
        for _ in range(n):
            kind = int(torch.randint(0, 4, (1,), generator=g))
            if kind < 3 and m:
                k = int(torch.randint(0, m, (1,), generator=g))
                base = gt_masks[k].clone()
                if kind == 1:
                    base |= _ring(base)  # spills into the void band
                elif kind == 2:
                    base &= ~_rect(g, h, w)  # a piece missing
                pred_masks.append(base)
                same = bool(torch.rand(1, generator=g) < 0.8)
                pred_labels.append(int(gt_labels[k]) if same else int(torch.randint(0, num_classes, (1,), generator=g)))
            else:
                pred_masks.append(_rect(g, h, w))
                pred_labels.append(int(torch.randint(0, num_classes, (1,), generator=g)))
        cases.append(
            Case(
                image_id=f"img_{i:03d}",
                gt_masks=torch.stack(gt_masks) if gt_masks else torch.zeros(0, h, w, dtype=torch.bool),
                gt_labels=gt_labels.long(),
                void=void,
                pred_masks=torch.stack(pred_masks) if pred_masks else torch.zeros(0, h, w, dtype=torch.bool),
                pred_labels=torch.tensor(pred_labels, dtype=torch.long),
                pred_scores=torch.zeros(n, dtype=torch.float64),
            )
        )
    # Scores distinct over the whole set, so no result depends on how ties are ordered.
    scores = torch.randperm(10_000, generator=g).double() / 10_000 + 0.00005
    start = 0
    for case in cases:
        n = len(case.pred_labels)
        case.pred_scores = scores[start : start + n]
        start += n
    return cases
