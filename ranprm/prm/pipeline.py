"""From images to instances: CRMs -> valid classes -> valid peaks -> PRMs -> retrieval.

One function serves validation during training, `ranprm-predict` and `ranprm-evaluate`, so the three can never
disagree. It depends on torch and the pure `ranprm.prm` stages only. Its settings arrive parsed, once, as an
`InferenceConfig`; nothing here reads a raw config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ranprm.errors import ConfigError
from ranprm.prm.backprop import PRM_MODES, PRM_PRECISIONS, check_mode, peak_response_maps, precision_dtype
from ranprm.prm.instances import Instances
from ranprm.prm.peaks import GridPeaks, ImagePeaks, PeakHead, peak_mask, upsample_crm
from ranprm.prm.retrieval import RetrievalConfig, build_retrieval, retrieve_instances
from ranprm.prm.thresholds import ClassCalibration, Thresholds, select_classes, select_peaks
from ranprm.utils.timing import stage

# The choices of `prm.mode` and `prm.precision` as enums, so a config schema refuses any other value when the config
# is composed (`ranprm.cli.schema`); they are str, so `PrmMode.probability == "probability"`.
PrmMode = StrEnum("PrmMode", {mode: mode for mode in PRM_MODES})
PrmPrecision = StrEnum("PrmPrecision", {name: name for name in PRM_PRECISIONS})


@dataclass(frozen=True)
class PrmConfig:
    """The `prm` config: peak response maps at inference (what `InferenceConfig.from_config` parses).

    mode:                   probability (PRM's rule) | gradient (plain gradient)
    sub_pixel_factor:       inference peak finding on the CRM up-sampled this many times (PRM's demo: 1)
    class_sub_pixel_factor: the class test's up-sampling at inference (PRM's demo: 1)
    max_peaks_per_image:    keep the strongest N valid peaks of an image; None: no cap
    chunk_size:             peaks per vectorised backward; None: by device and image size
    precision:              fp32 | bf16
    """

    mode: PrmMode = PrmMode.probability  # type: ignore[attr-defined]
    sub_pixel_factor: int = 1
    class_sub_pixel_factor: int = 1
    max_peaks_per_image: int | None = 50
    chunk_size: int | None = None
    precision: PrmPrecision = PrmPrecision.fp32  # type: ignore[attr-defined]


# `prm` config keys and their defaults as plain values (checkpoints written before a key existed get its default).
PRM_DEFAULTS: dict[str, Any] = {
    f.name: str(f.default) if isinstance(f.default, StrEnum) else f.default for f in fields(PrmConfig)
}


def _positive_int_or_none(prm: Mapping[str, Any], key: str) -> int | None:
    value = prm.get(key, PRM_DEFAULTS[key])
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"prm.{key}={value!r} must be a positive integer or null") from err
    if number < 1 or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"prm.{key}={value!r} must be a positive integer or null")
    return number


def _positive_int(prm: Mapping[str, Any], key: str) -> int:
    value = _positive_int_or_none(prm, key)
    if value is None:
        raise ConfigError(f"prm.{key} must be a positive integer, not null")
    return value


@dataclass(frozen=True)
class InferenceConfig:
    """Everything inference needs beyond the model, parsed from the `threshold`, `head`, `prm`, `retrieval` configs.

    thresholds:             valid classes and peaks (`ranprm.prm.thresholds`)
    head:                   the peak head: the class test's window, peak filter and stimulation switch
    sub_pixel_factor:       `prm.sub_pixel_factor`, CRM up-sampling before inference peak finding (PRM's demo: 1)
    class_sub_pixel_factor: `prm.class_sub_pixel_factor`, the up-sampling of the class test at inference (PRM's
                            demo: 1); the training score uses `head.sub_pixel_factor` (PRM: 8)
    max_peaks_per_image:    `prm.max_peaks_per_image`, keep at most this many valid peaks per image, the
                            strongest (highest CRM value) first; None: no cap (PRM's official code has none)
    prm_mode, chunk_size, prm_dtype: peak backpropagation (`ranprm.prm.backprop`)
    retrieval:              the parsed retrieval method config (`ranprm.prm.retrieval`)
    """

    thresholds: Thresholds
    head: PeakHead = PeakHead()
    sub_pixel_factor: int = 1
    class_sub_pixel_factor: int = 1
    max_peaks_per_image: int | None = 50
    prm_mode: str = "probability"
    chunk_size: int | None = None
    prm_dtype: torch.dtype = torch.float32  # bf16: faster, maps within ~1e-3 on average (the panels use it)
    retrieval: RetrievalConfig = field(default_factory=lambda: build_retrieval(None))

    @classmethod
    def from_config(
        cls,
        threshold: Mapping[str, Any],
        head: Mapping[str, Any],
        prm: Mapping[str, Any] | None,
        retrieval: Mapping[str, Any] | None,
        calibration: ClassCalibration | None = None,
    ) -> InferenceConfig:
        """Parse the four config groups once; `calibration` feeds `threshold.class_distribution: dataset`."""
        prm = dict(prm or {})
        unknown = sorted(set(prm) - set(PRM_DEFAULTS))
        if unknown:
            raise ConfigError(f"prm: unknown option(s) {unknown}; known: {sorted(PRM_DEFAULTS)}")
        return cls(
            thresholds=Thresholds.from_config(threshold, calibration),
            head=PeakHead.from_config(head),
            sub_pixel_factor=_positive_int(prm, "sub_pixel_factor"),
            class_sub_pixel_factor=_positive_int(prm, "class_sub_pixel_factor"),
            max_peaks_per_image=_positive_int_or_none(prm, "max_peaks_per_image"),
            prm_mode=check_mode(str(prm.get("mode") or PRM_DEFAULTS["mode"])),
            chunk_size=_positive_int_or_none(prm, "chunk_size"),
            prm_dtype=precision_dtype(str(prm.get("precision") or PRM_DEFAULTS["precision"])),
            retrieval=build_retrieval(retrieval),
        )

    def class_scores(self, crms: Tensor) -> Tensor:
        """The class test's scores (B, C) of CRMs (B, C, h, w): the peak head at the inference class factor."""
        return self.head.scores(crms, self.class_sub_pixel_factor)


@dataclass
class ImagePrediction:
    """What the model says about one image, at its original size."""

    instances: Instances
    class_logits: Tensor  # (C,) the class test's scores (`InferenceConfig.class_scores`)
    valid_classes: Tensor  # (V,) long
    image_peaks: ImagePeaks  # every valid peak (after the cap), in original-image pixels
    crms: Tensor  # (C, h, w) raw class response maps
    attention: list[Tensor] = field(default_factory=list)  # (h_i, w_i) per attention module, when asked for
    # (K, H, W) float in [0, 1], the PRM of each row of `peaks` at the original size, as retrieval received it
    # (before NMS merges the maps of suppressed instances into `instances.prms`); when asked for (the panels)
    prms: Tensor | None = None
    # (K,) each PRM's maximum before it was scaled to [0, 1], with `prms`: the panels show how strong each map is
    prm_maxima: Tensor | None = None
    peaks_over_cap: int = 0  # valid peaks dropped by prm.max_peaks_per_image

    @property
    def peaks(self) -> Tensor:
        """(K, 3) float `[class, y, x]` of `image_peaks` (the layout panels and overlays draw)."""
        return self.image_peaks.rows()


def cap_peaks_per_image(peaks: GridPeaks, batch_size: int, cap: int | None) -> tuple[GridPeaks, list[int]]:
    """Keep at most `cap` peaks per image, the highest values first (ties: the earlier peak); order is kept.

    Returns the kept peaks and, per image, how many were dropped.
    """
    dropped = [0] * batch_size
    if cap is None or len(peaks) == 0:
        return peaks, dropped
    keep = torch.ones(len(peaks), dtype=torch.bool, device=peaks.index.device)
    for b in range(batch_size):
        rows = peaks.rows_of(b)
        if len(rows) <= cap:
            continue
        order = torch.sort(peaks.values[rows], descending=True, stable=True).indices
        keep[rows[order[cap:]]] = False
        dropped[b] = len(rows) - cap
    return peaks.select(keep), dropped


def select_valid_peaks(crms: Tensor, class_logits: Tensor, cfg: InferenceConfig) -> tuple[GridPeaks, Tensor]:
    """Valid peaks of a batch by the thresholds (before the per-image cap).

    crms: (B, C, h, w); class_logits: (B, C) the class test's scores.
    Returns `(peaks on the CRM grid up-sampled by cfg.sub_pixel_factor, valid_classes (B, C) bool)`.
    """
    valid_classes = select_classes(class_logits, cfg.thresholds)
    fine = upsample_crm(crms, cfg.sub_pixel_factor)
    candidates = peak_mask(fine, cfg.head.window, cfg.head.peak_filter) & valid_classes[:, :, None, None]
    peaks = GridPeaks.from_mask(candidates, fine, tuple(crms.shape[2:]), cfg.sub_pixel_factor)
    keep = torch.zeros(len(peaks), dtype=torch.bool, device=crms.device)
    for b, c in valid_classes.nonzero(as_tuple=False).tolist():  # one rule call per valid (image, class)
        rows = ((peaks.index[:, 0] == b) & (peaks.index[:, 1] == c)).nonzero(as_tuple=True)[0]
        keep[rows] = select_peaks(peaks.values[rows], cfg.thresholds.peaks)
    return peaks.select(keep), valid_classes


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
    raw_images: Sequence[np.ndarray | None] | None = None,
    stage_times: dict[str, float] | None = None,
    with_attention: bool = False,
    with_prms: bool = False,
) -> list[ImagePrediction]:
    """Instances for a batch of network inputs `images (B, 3, S, S)` whose originals had `orig_sizes`.

    `model` maps images to CRMs; the class test is `cfg.class_scores`. `raw_images` are the original uint8 RGB
    images, needed only by proposal-based retrieval. `stage_times`, when given, receives the seconds spent in
    `forward`, `select` (valid classes and peaks), `prm` (peak backprop) and `retrieval`.
    `with_attention`: also fill `ImagePrediction.attention` from the same forward, for models that have
    `forward_with_attention` (RAN); a second forward just for the masks would cost as much as this one.
    `with_prms`: also keep each valid peak's own PRM in `ImagePrediction.prms` (the panels show them).
    """
    device = images.device
    with stage(stage_times, "forward", device), torch.no_grad():
        forward_with_attention = getattr(model, "forward_with_attention", None) if with_attention else None
        crms, attention = forward_with_attention(images) if forward_with_attention else (model(images), [])
        class_logits = cfg.class_scores(crms)
    with stage(stage_times, "select", device):
        peaks, valid_classes = select_valid_peaks(crms, class_logits, cfg)
        peaks, dropped = cap_peaks_per_image(peaks, len(images), cfg.max_peaks_per_image)
    with stage(stage_times, "prm", device):
        prms = peak_response_maps(
            model,
            images,
            peaks.index,
            sub_pixel_factor=cfg.sub_pixel_factor,
            mode=cfg.prm_mode,
            chunk_size=cfg.chunk_size,
            dtype=cfg.prm_dtype,
        )
    with stage(stage_times, "retrieval", device):
        predictions = []
        for b, size in enumerate(orig_sizes):
            size = (int(size[0]), int(size[1]))
            rows = peaks.rows_of(b)
            image_peaks = peaks.in_image(b, size)
            raw_prms = _resize_maps(prms[rows].float(), size)
            image_prms = _renormalise(raw_prms)
            instances = retrieve_instances(
                cfg.retrieval,
                prms=image_prms,
                peaks=image_peaks,
                class_logits=class_logits[b],
                crms=crms[b].float(),
                image=raw_images[b] if raw_images is not None else None,
            )
            predictions.append(
                ImagePrediction(
                    instances=instances.to("cpu"),
                    class_logits=class_logits[b].cpu(),
                    valid_classes=valid_classes[b].nonzero(as_tuple=True)[0].cpu(),
                    image_peaks=image_peaks.to("cpu"),
                    crms=crms[b].cpu(),
                    attention=[maps[b].float().cpu() for maps in attention],
                    prms=image_prms.cpu() if with_prms else None,
                    prm_maxima=raw_prms.flatten(1).amax(1).cpu() if with_prms and len(raw_prms) else None,
                    peaks_over_cap=dropped[b],
                )
            )
        return predictions
