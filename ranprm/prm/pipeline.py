"""From images to instances: CRMs -> valid classes -> valid peaks -> PRMs -> retrieval.

One function serves validation during training, `ranprm-predict` and `ranprm-evaluate`, so the three can never
disagree. It depends on torch and the pure `ranprm.prm` stages only. Its settings arrive parsed, once, as an
`InferenceConfig`; nothing here reads a raw config.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

import cv2
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
from ranprm.utils.stop import check_stop
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
    gradient_path:          `backbone.mask_grad` for the peak backprop (attention trunks); None: the model's own
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
    # The soft masks' gradient path for peak backprop on attention trunks (`full` | `detached`); None: the
    # model's own. Only the backward differs, so variants that differ here share the forward.
    gradient_path: str | None = None

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


def _resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) bool -> (N, H, W) bool, nearest neighbour (the official code's `imresize(..., 'nearest')`)."""
    if masks.shape[-2:] == size:
        return masks
    if len(masks) == 0:
        return masks.new_zeros(0, *size)
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5


def _instances_at(instances: Instances, size: tuple[int, int]) -> Instances:
    """Instances retrieved at another size, brought back to the image's `size` (H, W): masks nearest, maps
    bilinear, peak pixel centres rescaled."""
    if tuple(instances.image_size) == size:
        return instances
    h, w = instances.image_size
    scale = torch.tensor([size[0] / h, size[1] / w], device=instances.peaks.device)
    return Instances(
        image_size=size,
        masks=_resize_masks(instances.masks, size),
        labels=instances.labels,
        scores=instances.scores,
        peaks=(instances.peaks.float() + 0.5) * scale - 0.5,
        prms=_resize_maps(instances.prms.float(), size),
    )


def _resize_image(image: np.ndarray | None, size: tuple[int, int]) -> np.ndarray | None:
    """An RGB uint8 image at `size` (H, W) (bilinear, OpenCV), for a method that reads the image itself."""
    if image is None or tuple(image.shape[:2]) == size:
        return image
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


@contextmanager
def gradient_path(model: nn.Module, mask_grad: str | None) -> Iterator[None]:
    """Run the block with the soft masks of `model`'s attention trunk on gradient path `mask_grad`
    (`full` | `detached`, `backbone.mask_grad`); the model's own path is restored after. None: unchanged.

    Only the backward differs between the paths (`ranprm.models.attention`), so one forward serves both."""
    if mask_grad is None:
        yield
        return
    backbone = getattr(model, "backbone", model)
    setter = getattr(backbone, "set_mask_grad", None)
    masks = [m for m in backbone.modules() if m is not backbone and hasattr(m, "mask_grad")]
    if setter is None or not masks:
        raise ConfigError(
            f"mask_grad={mask_grad}: the model's backbone ({type(backbone).__name__}) has no attention soft masks, so "
            "it has one gradient path; drop mask_grad from the variants"
        )
    before = getattr(backbone, "_mask_grad", "full")
    setter(mask_grad)
    try:
        yield
    finally:
        setter(before)


def _check_shared(variants: Sequence[InferenceConfig]) -> None:
    """Variants share the forward, the class test and the peak grid: the settings those read must agree."""
    first = variants[0]
    for cfg in variants[1:]:
        for name in ("head", "sub_pixel_factor", "class_sub_pixel_factor"):
            if getattr(cfg, name) != getattr(first, name):
                raise ConfigError(
                    f"inference variants share one forward and one class test, so they must agree on {name} "
                    f"({getattr(first, name)} vs {getattr(cfg, name)}); vary threshold, retrieval or mask_grad only"
                )


@dataclass(frozen=True, eq=False)
class _PeakUnion:
    """The union of the valid peaks of the variants that share a backward (gradient path, mode, dtype, chunks),
    and their PRMs at the network input size; `positions[i]` maps variant i's peak rows into the union's rows."""

    peaks: GridPeaks
    prms: Tensor
    positions: dict[int, Tensor]


def _peak_unions(
    model: nn.Module, images: Tensor, variants: Sequence[InferenceConfig], peaks: Sequence[GridPeaks]
) -> dict[int, _PeakUnion]:
    """Per variant index, the union it belongs to; each union's PRMs are computed once, one backward per peak."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, cfg in enumerate(variants):
        groups.setdefault((cfg.gradient_path, cfg.prm_mode, cfg.prm_dtype, cfg.chunk_size), []).append(i)
    unions: dict[int, _PeakUnion] = {}
    for members in groups.values():
        cfg = variants[members[0]]
        index = torch.cat([peaks[i].index for i in members])
        # Sorted by (image, class, y, x): the order `GridPeaks.from_mask` gives, so one variant's union is itself.
        unique, inverse = torch.unique(index, dim=0, return_inverse=True)
        values = torch.cat([peaks[i].values for i in members])
        union_values = values.new_empty(len(unique))
        union_values[inverse] = values
        union = GridPeaks(unique, union_values, peaks[members[0]].grid_size, peaks[members[0]].sub_pixel_factor)
        with gradient_path(model, cfg.gradient_path):
            prms = peak_response_maps(
                model,
                images,
                union.index,
                sub_pixel_factor=cfg.sub_pixel_factor,
                mode=cfg.prm_mode,
                chunk_size=cfg.chunk_size,
                dtype=cfg.prm_dtype,
            )
        positions = dict(zip(members, torch.split(inverse, [len(peaks[i]) for i in members]), strict=True))
        shared = _PeakUnion(union, prms, positions)
        unions.update(dict.fromkeys(members, shared))
    return unions


def _image_maps(
    cache: dict[tuple[int, tuple[int, int]], tuple[Tensor, Tensor]],
    union: _PeakUnion,
    rows: Tensor,
    size: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """One image's union PRMs (`rows` of the union) at `size`, each re-normalised to a maximum of 1, and each map's
    maximum before that (the panels draw PRMs at their own magnitude); made once per (union, size) and shared by
    the variants that read them."""
    key = (id(union), size)
    if key not in cache:
        raw = _resize_maps(union.prms[rows].float(), size)
        cache[key] = (_renormalise(raw), raw.flatten(1).amax(1) if len(raw) else raw.new_zeros(0))
    return cache[key]


def predict_variants(
    model: nn.Module,
    images: Tensor,
    orig_sizes: Sequence[tuple[int, int]],
    variants: Sequence[InferenceConfig],
    raw_images: Sequence[np.ndarray | None] | None = None,
    stage_times: dict[str, float] | None = None,
    with_attention: bool = False,
    with_prms: bool = False,
) -> list[list[ImagePrediction]]:
    """Instances of a batch under each of several inference settings: `out[v][b]` for variant v and image b.

    The forward and the class test run once; each variant selects its valid peaks; the PRMs of the union of
    those peaks run once per gradient path (one backward per peak, not one per peak and variant); segment
    proposals are built once per image and setting; then each variant retrieves from its own peaks' PRMs. A
    variant's predictions are those `predict_batch` gives it alone. Variants must share `head`,
    `sub_pixel_factor` and `class_sub_pixel_factor` (they decide the forward's peaks grid and the class test).
    """
    if not variants:
        raise ValueError("predict_variants needs at least one inference variant")
    _check_shared(variants)
    device = images.device
    with stage(stage_times, "forward", device), torch.no_grad():
        forward_with_attention = getattr(model, "forward_with_attention", None) if with_attention else None
        crms, attention = forward_with_attention(images) if forward_with_attention else (model(images), [])
        class_logits = variants[0].class_scores(crms)
    with stage(stage_times, "select", device):
        selected = []
        for cfg in variants:
            peaks, valid = select_valid_peaks(crms, class_logits, cfg)
            peaks, dropped = cap_peaks_per_image(peaks, len(images), cfg.max_peaks_per_image)
            selected.append((peaks, valid, dropped))
    with stage(stage_times, "prm", device):
        unions = _peak_unions(model, images, variants, [peaks for peaks, _, _ in selected])
    with stage(stage_times, "retrieval", device):
        out: list[list[ImagePrediction]] = [[] for _ in variants]
        for b, size in enumerate(orig_sizes):
            check_stop()  # between images: a stop signal is answered in seconds, not at the end of the batch
            size = (int(size[0]), int(size[1]))
            raw = raw_images[b] if raw_images is not None else None
            maps: dict[tuple[int, tuple[int, int]], tuple[Tensor, Tensor]] = {}  # (union, size) -> the PRMs there
            proposals: dict[Any, Tensor] = {}  # (proposal source, size) -> the image's proposals there
            for v, cfg in enumerate(variants):
                peaks, valid, dropped = selected[v]
                union = unions[v]
                union_rows = union.peaks.rows_of(b)
                first_row = int(union_rows[0]) if len(union_rows) else 0
                local = union.positions[v][peaks.rows_of(b)] - first_row  # the image's rows are contiguous
                work = (cfg.retrieval.size, cfg.retrieval.size) if cfg.retrieval.size else size

                source = cfg.retrieval.proposal_source() if raw is not None else None
                if source is not None and (source, work) not in proposals:
                    if (source, size) not in proposals:  # built once at the original size, as PRM's MCG proposals
                        proposals[(source, size)] = torch.from_numpy(cfg.retrieval.make_proposals(raw))
                    proposals[(source, work)] = _resize_masks(proposals[(source, size)], work)
                instances = retrieve_instances(
                    cfg.retrieval,
                    prms=_image_maps(maps, union, union_rows, work)[0][local],
                    peaks=peaks.in_image(b, work),
                    class_logits=class_logits[b],
                    crms=crms[b].float(),
                    image=_resize_image(raw, work),
                    proposals=proposals.get((source, work)) if source is not None else None,
                )
                out[v].append(
                    ImagePrediction(
                        instances=_instances_at(instances.to("cpu"), size),
                        class_logits=class_logits[b].cpu(),
                        valid_classes=valid[b].nonzero(as_tuple=True)[0].cpu(),
                        image_peaks=peaks.in_image(b, size).to("cpu"),
                        crms=crms[b].cpu(),
                        attention=[maps_[b].float().cpu() for maps_ in attention],
                        prms=_image_maps(maps, union, union_rows, size)[0][local].cpu() if with_prms else None,
                        prm_maxima=_image_maps(maps, union, union_rows, size)[1][local].cpu() if with_prms else None,
                        peaks_over_cap=dropped[b],
                    )
                )
        return out


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
    One variant of `predict_variants`, so one setting alone and among others gives the same instances.
    """
    return predict_variants(model, images, orig_sizes, [cfg], raw_images, stage_times, with_attention, with_prms)[0]
