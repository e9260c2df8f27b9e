"""From images to instances: CRMs -> valid classes -> valid peaks -> PRMs -> retrieval.

One function serves validation during training, `ranprm-predict` and `ranprm-evaluate`, so the three can never
disagree. It depends on torch and the pure `ranprm.prm` stages only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ranprm.prm.backprop import check_mode, peak_response_maps, precision_dtype
from ranprm.prm.instances import Instances
from ranprm.prm.peaks import find_peaks, to_image_coordinates, upsample_crm
from ranprm.prm.retrieval import retrieve_instances
from ranprm.prm.thresholds import Thresholds, select_classes, select_peaks
from ranprm.utils.timing import stage


@dataclass(frozen=True)
class InferenceConfig:
    """Everything inference needs beyond the model, built from the `threshold`, `head`, `prm`, `retrieval` configs."""

    thresholds: Thresholds
    window: int = 3
    peak_filter: str | float = "median"
    sub_pixel_factor: int = 1
    prm_mode: str = "probability"
    chunk_size: int | None = None
    prm_dtype: torch.dtype = torch.float32  # bf16: faster, maps within ~1e-3 on average (the panels use it)
    retrieval: dict[str, Any] | None = None

    @classmethod
    def from_config(
        cls, threshold: dict[str, Any], head: dict[str, Any], prm: dict[str, Any], retrieval: dict[str, Any]
    ) -> InferenceConfig:
        return cls(
            thresholds=Thresholds.from_config(threshold),
            window=int(head["window"]),
            peak_filter=head["peak_filter"],
            sub_pixel_factor=int(prm.get("sub_pixel_factor", 1)),
            prm_mode=check_mode(str(prm.get("mode", "probability"))),
            chunk_size=prm.get("chunk_size"),
            prm_dtype=precision_dtype(str(prm.get("precision") or "fp32")),  # checkpoints before it: fp32
            retrieval=dict(retrieval),
        )


@dataclass
class ImagePrediction:
    """What the model says about one image, at its original size."""

    instances: Instances
    class_logits: Tensor  # (C,)
    valid_classes: Tensor  # (V,) long
    peaks: Tensor  # (K, 3) float [class, y, x] in original-image pixels, every valid peak
    crms: Tensor  # (C, h, w) raw class response maps
    attention: list[Tensor] = field(default_factory=list)  # (h_i, w_i) per attention module, when asked for
    # (K, H, W) float in [0, 1], the PRM of each row of `peaks` at the original size, as retrieval received it
    # (before NMS merges the maps of suppressed instances into `instances.prms`); when asked for (the panels)
    prms: Tensor | None = None


def select_valid_peaks(crms: Tensor, class_logits: Tensor, cfg: InferenceConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Valid peaks of a batch by the threshold strategies.

    crms: (B, C, h, w); class_logits: (B, C).
    Returns `(peaks (K, 4) long [batch, class, y, x] on the CRM grid up-sampled by cfg.sub_pixel_factor,
    values (K,), valid_classes (B, C) bool)`.
    """
    valid_classes = select_classes(class_logits, cfg.thresholds)
    fine = upsample_crm(crms, cfg.sub_pixel_factor)
    candidates = find_peaks(fine, cfg.window, cfg.peak_filter) & valid_classes[:, :, None, None]
    coords = candidates.nonzero(as_tuple=False)  # (K', 4), sorted by batch then class
    values = fine[coords[:, 0], coords[:, 1], coords[:, 2], coords[:, 3]]
    keep = torch.zeros(len(coords), dtype=torch.bool, device=crms.device)
    for b, c in valid_classes.nonzero(as_tuple=False).tolist():  # one strategy call per valid (image, class)
        rows = ((coords[:, 0] == b) & (coords[:, 1] == c)).nonzero(as_tuple=True)[0]
        keep[rows] = select_peaks(values[rows], cfg.thresholds.peaks)
    return coords[keep], values[keep], valid_classes


def _resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) -> (N, H, W) bilinear."""
    if maps.shape[-2:] == size or len(maps) == 0:
        return maps if len(maps) else maps.new_zeros(0, *size)
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _renormalise(prms: Tensor) -> Tensor:
    peak = prms.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (prms / peak).clamp(0, 1)


def predict_batch(
    model: nn.Module,
    images: Tensor,
    orig_sizes: Sequence[tuple[int, int]],
    cfg: InferenceConfig,
    score_fn: Callable[[Tensor], Tensor],
    raw_images: Sequence[np.ndarray | None] | None = None,
    stage_times: dict[str, float] | None = None,
    with_attention: bool = False,
    with_prms: bool = False,
) -> list[ImagePrediction]:
    """Instances for a batch of network inputs `images (B, 3, S, S)` whose originals had `orig_sizes`.

    `model` maps images to CRMs; `score_fn` maps CRMs to class logits (the training head). `raw_images` are the
    original uint8 RGB images, needed only by proposal-based retrieval. `stage_times`, when given, receives the
    seconds spent in `forward`, `select` (valid classes and peaks), `prm` (peak backprop) and `retrieval`.
    `with_attention`: also fill `ImagePrediction.attention` from the same forward, for models that have
    `forward_with_attention` (RAN); a second forward just for the masks would cost as much as this one.
    `with_prms`: also keep each valid peak's own PRM in `ImagePrediction.prms` (the panels show them).
    """
    device = images.device
    with stage(stage_times, "forward", device), torch.no_grad():
        forward_with_attention = getattr(model, "forward_with_attention", None) if with_attention else None
        crms, attention = forward_with_attention(images) if forward_with_attention else (model(images), [])
        class_logits = score_fn(crms)
    with stage(stage_times, "select", device):
        peaks, values, valid_classes = select_valid_peaks(crms, class_logits, cfg)
    with stage(stage_times, "prm", device):
        prms = peak_response_maps(
            model,
            images,
            peaks,
            sub_pixel_factor=cfg.sub_pixel_factor,
            mode=cfg.prm_mode,
            chunk_size=cfg.chunk_size,
            dtype=cfg.prm_dtype,
        )
    with stage(stage_times, "retrieval", device):
        predictions = []
        for b, size in enumerate(orig_sizes):
            size = (int(size[0]), int(size[1]))
            rows = (peaks[:, 0] == b).nonzero(as_tuple=True)[0]
            peaks_yx = to_image_coordinates(peaks[rows, 2:], crms.shape[2:], cfg.sub_pixel_factor, size)
            labels = peaks[rows, 1]
            crms_up = _resize_maps(crms[b].float(), size)
            image_prms = _renormalise(_resize_maps(prms[rows].float(), size))
            instances = retrieve_instances(
                cfg.retrieval,
                prms=image_prms,
                peaks_yx=peaks_yx,
                labels=labels,
                peak_values=values[rows],
                class_logits=class_logits[b],
                crms=crms_up,
                image=raw_images[b] if raw_images is not None else None,
            )
            predictions.append(
                ImagePrediction(
                    instances=instances.to("cpu"),
                    class_logits=class_logits[b].cpu(),
                    valid_classes=valid_classes[b].nonzero(as_tuple=True)[0].cpu(),
                    peaks=torch.cat([labels[:, None].float(), peaks_yx], 1).cpu(),
                    crms=crms[b].cpu(),
                    attention=[maps[b].float().cpu() for maps in attention],
                    prms=image_prms.cpu() if with_prms else None,
                )
            )
        return predictions
