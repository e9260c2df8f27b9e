"""Peak backpropagation: peak response maps (PRMs), all peaks of a batch in one vectorised backward.

A *CRM model* is any `nn.Module` mapping images `(B, 3, H, W)` to class response maps `(B, C, h, w)`. A peak
is a row `[batch, class, y, x]` of a `(K, 4)` long tensor, on the CRM grid after bilinear up-sampling by
`sub_pixel_factor` (`ranprm.prm.peaks.upsample_crm`). It seeds a one-hot gradient on that up-sampled CRM; its
PRM is the gradient w.r.t. the input image, summed over RGB, clamped at 0 and divided by its maximum.

Two modes:
- `probability`, PRM's rule (docs/method.md, "Peak backpropagation"): the backward of every `nn.Conv2d` is
  replaced, its forward is not. For input x, weights W and upstream gradient g, with `m = x.min()` and
  W+ = relu(W):
  `Z = conv(x - m, W+)` (no bias) and `grad_x = (x - m) * conv_transpose(g / Z, W+)`, with `g / Z := 0` where
  `Z < 1e-10`. ReLU, BN, pooling, resizes and adds keep their ordinary backward.
- `gradient`: the plain gradient.

Two implementations that share no code on the rule, so each checks the other:
- `peak_response_maps` (batched): one forward per group of images, then one backward vectorised over peaks
  (`torch.func.vjp` + `torch.func.vmap`), w.r.t. the images only: no weight gradient is computed or stored.
  The convolution rule is one autograd Function (`_ProbabilityConv2d`) whose forward computes, once per image,
  the shifted input `x - m`, W+ and `1 / Z`; its backward is then one transposed convolution and two products.
- `peak_response_maps_looped` (reference): PRM's official procedure, batch 1, one forward then one
  `.backward(retain_graph=True)` per peak with the weights requiring grad; the rule comes from autograd
  through the official pair of hooks (a gradient multiplier on the input, a gradient divider on the output,
  `Z` as a differentiable convolution).

Why `torch.func` and not `torch.autograd.grad(..., is_grads_batched=True)`: the latter runs the legacy vmap,
which has no batching rule for convolution or max-pool backward and silently loops over the peaks.

**Ours:** `m` is the minimum over *one image's* tensor. The official code runs batch 1, where that is
`x.min()`; per image it stays so in a batch, and a PRM does not depend on which other images share the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ranprm.errors import ConfigError
from ranprm.prm.peaks import upsample_crm

PRMMode = Literal["probability", "gradient"]
PRM_MODES: tuple[str, ...] = ("probability", "gradient")
Z_EPS = 1e-10  # the official threshold under which a normaliser counts as zero
# An image joins a group (one shared forward and backward) while the padded slots stay under this share of the
# useful ones: a group's backward runs (its largest peak count) x (its images) passes, padding included.
_GROUP_SLACK = 1.25

ConvForward = Callable[[nn.Conv2d, Tensor, Tensor, Tensor | None], Tensor]


# `prm.precision`: the dtype peak backprop runs in (see `peak_response_maps`' `dtype`).
PRM_PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype of a `prm.precision` name, else a `ConfigError` naming the option."""
    if precision not in PRM_PRECISIONS:
        raise ConfigError(f"prm.precision={precision!r} is not valid; choose one of {list(PRM_PRECISIONS)}")
    return PRM_PRECISIONS[precision]


def check_mode(mode: str) -> PRMMode:
    """`mode` if it is a known PRM mode, else a `ConfigError` naming the option."""
    if mode not in PRM_MODES:
        raise ConfigError(f"prm.mode={mode!r} is not valid; choose one of {list(PRM_MODES)}")
    return mode  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------------
# Convolution geometry shared by both implementations


def _same_padding(conv: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """Symmetric padding (ph, pw) for `padding='same'`, plus an explicit (left, right, top, bottom) pre-pad
    when an even effective kernel needs one more row/column at the end (where `F.conv2d` puts it)."""
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    sym = (totals[0] // 2, totals[1] // 2)
    if all(t % 2 == 0 for t in totals):
        return sym, None
    # F.pad's order is last dimension first: (left, right, top, bottom).
    extra = (0, totals[1] % 2, 0, totals[0] % 2)
    return sym, extra


def _geometry(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple[int, int], tuple[int, int, int, int] | None]:
    """The conv's input after any non-zero padding mode, its zero padding (ph, pw), an optional zero pre-pad.

    Non-zero padding modes (reflect, replicate, circular) are applied outside the rule, as `nn.Conv2d` does:
    their values copy x's, so `m` is unchanged, and autograd routes their gradient back to the copied pixels.
    """
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0, 0), None
    if conv.padding == "valid":
        return x, (0, 0), None
    if conv.padding == "same":
        padding, extra = _same_padding(conv)
        return x, padding, extra
    ph, pw = conv.padding  # type: ignore[misc]
    return x, (int(ph), int(pw)), None


# ------------------------------------------------------------------------------------------------------------
# Batched path: the rule as one autograd Function whose backward is vmap-friendly


class _ProbabilityConv2d(torch.autograd.Function):
    """`conv2d(x, W, b)` forward; PRM's probability rule backward w.r.t. x only (never W or b).

    x: (B, Cin, H, W) -> out (B, Cout, h, w). The forward also returns what the backward needs and what does
    not depend on the peak, so it is computed once per image instead of once per peak: the shifted input
    `x - m` (zero-padded when `pre_pad` is given), W+ and `1 / Z` (0 where `Z < 1e-10`).
    """

    generate_vmap_rule = True  # the backward is plain torch ops, so vmap can batch it over peaks

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        pre_pad: tuple[int, int, int, int] | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x_in = x if pre_pad is None else F.pad(x, pre_pad)
        out = F.conv2d(x_in, weight, bias, stride, padding, dilation, groups)
        shifted = x - x.amin(dim=(1, 2, 3), keepdim=True)
        if pre_pad is not None:
            # The conv's own zero padding sits in shifted space too (official: conv(x - m, W+, padding)).
            shifted = F.pad(shifted, pre_pad)
        pos_weight = weight.clamp_min(0)
        z = F.conv2d(shifted, pos_weight, None, stride, padding, dilation, groups)
        inv_z = torch.where(z >= Z_EPS, z.reciprocal(), torch.zeros_like(z))
        return out, shifted, pos_weight, inv_z

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        _, _, _, stride, padding, dilation, groups, pre_pad = inputs
        out, shifted, pos_weight, inv_z = output
        ctx.mark_non_differentiable(shifted, pos_weight, inv_z)
        ctx.set_materialize_grads(False)  # the three side outputs never get a gradient; don't allocate zeros
        ctx.save_for_backward(shifted, pos_weight, inv_z)
        # conv_transpose2d needs the rows/columns that the strided forward dropped to give back x's size.
        kernel = pos_weight.shape[-2:]
        ctx.output_padding = tuple(
            shifted.shape[2 + i]
            - ((out.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
            for i in range(2)
        )
        ctx.conv = (stride, padding, dilation, groups)
        ctx.pre_pad = pre_pad

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        nones: tuple[None, ...] = (None,) * 7
        if grad_out is None or not ctx.needs_input_grad[0]:
            return (None, *nones)
        shifted, pos_weight, inv_z = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        spread = F.conv_transpose2d(
            grad_out * inv_z, pos_weight, None, stride, padding, ctx.output_padding, groups, dilation
        )
        grad_x = shifted * spread
        if ctx.pre_pad is not None:
            left, right, top, bottom = ctx.pre_pad
            grad_x = grad_x[..., top : grad_x.shape[-2] - bottom, left : grad_x.shape[-1] - right]
        return (grad_x, *nones)


def _probability_conv_forward(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Replacement for `nn.Conv2d._conv_forward`: same output, the probability rule as its backward."""
    x, padding, pre_pad = _geometry(conv, x)
    out, *_ = _ProbabilityConv2d.apply(
        x, weight, bias, tuple(conv.stride), padding, tuple(conv.dilation), conv.groups, pre_pad
    )
    return out


# ------------------------------------------------------------------------------------------------------------
# Reference path: the official mechanism, the rule obtained from autograd through two gradient hooks


class _ShiftGrad(torch.autograd.Function):
    """Identity forward on x; backward multiplies the gradient by `x - m` (the official `PreHook`: it saves
    x and m and recomputes the shift for every peak)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, m: Tensor) -> Tensor:
        ctx.save_for_backward(x, m)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x, m = ctx.saved_tensors
        return (x - m) * grad, None


class _DivideGrad(torch.autograd.Function):
    """Forward returns `value`; backward sends `g / z` to `z`, 0 where `z < 1e-10` (the official `PostHook`,
    which also redoes the division and the mask for every peak)."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        (z,) = ctx.saved_tensors
        grad_z = grad / z  # the official adds 1e-10 to z here; docs/method.md's rule, which we follow, does not
        grad_z[z < Z_EPS] = 0.0  # also clears the inf/nan of z == 0
        return None, grad_z


def _reference_conv_forward(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Replacement for `nn.Conv2d._conv_forward` in the official style (batch 1): the forward value is the
    ordinary convolution, detached; the gradient reaches x only through `Z = conv(x - m, W+)`."""
    x_in, padding, pre_pad = _geometry(conv, x)
    value = F.conv2d(x_in if pre_pad is None else F.pad(x_in, pre_pad), weight, bias, conv.stride, padding,
                     conv.dilation, conv.groups).detach()  # fmt: skip
    m = x_in.min().detach()  # over the whole tensor, as the official code does: the reference runs batch 1
    shifted = _ShiftGrad.apply(x_in, m) - m
    if pre_pad is not None:
        shifted = F.pad(shifted, pre_pad)
    z = F.conv2d(shifted, F.relu(weight).detach(), None, conv.stride, padding, conv.dilation, conv.groups)
    return _DivideGrad.apply(value, z)


# ------------------------------------------------------------------------------------------------------------
# Batched path: eval-mode BatchNorm with a backward that vmap batches cheaply


class _FrozenBatchNorm(torch.autograd.Function):
    """Eval-mode batch norm, `F.batch_norm` forward (bit-identical), backward `g * weight / sqrt(var + eps)`.

    That is BN's ordinary input gradient in eval mode; written out, it is one broadcast product. vmap's
    batching rule for the native BN backward instead expands the saved input to every peak and computes the
    weight and bias gradients too, which made BN a fifth of the batched backward's time.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor]:
        out = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight
        return out, scale.view(-1, *([1] * (x.ndim - 2)))  # (C, 1, ..., 1): broadcasts over (N, C, ...)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        _, scale = output
        ctx.mark_non_differentiable(scale)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(scale)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        (scale,) = ctx.saved_tensors
        grad_x = None if grad_out is None or not ctx.needs_input_grad[0] else grad_out * scale
        return grad_x, None, None, None, None, None


def _frozen_batchnorm_forward(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """Replacement for an eval-mode BN's `forward`: same output, `_FrozenBatchNorm`'s backward."""
    bn._check_input_dim(x)
    out, _ = _FrozenBatchNorm.apply(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    return out


def _is_plain_eval_batchnorm(module: nn.Module) -> bool:
    """A BN that normalises with its running statistics and whose forward is torch's own (not a subclass')."""
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and type(module).forward is nn.modules.batchnorm._BatchNorm.forward
        and not module.training
        and module.running_mean is not None
        and module.running_var is not None
    )


# ------------------------------------------------------------------------------------------------------------
# Scoped patching

_MISSING = object()


def _shadow(module: nn.Module, name: str, value: Any, undo: list[tuple[nn.Module, str, Any]]) -> None:
    """Set the instance attribute `name` (shadowing the class method) and record how to undo it."""
    undo.append((module, name, module.__dict__.get(name, _MISSING)))
    object.__setattr__(module, name, value)


@contextmanager
def _patched(model: nn.Module, conv_forward: ConvForward | None, frozen_batchnorm: bool = False) -> Iterator[nn.Module]:
    """Eval mode; every Conv2d's `_conv_forward` replaced by `conv_forward` (if given) and, with
    `frozen_batchnorm`, every plain eval BN's forward by `_frozen_batchnorm_forward`; all undone on exit.

    Patching `_conv_forward` (an instance attribute shadowing the class method) rather than `forward` also
    covers Conv2d subclasses that transform the weight before calling it. Everything is restored in `finally`,
    so an exception inside the block leaves the model as it was: same training flags, no instance attributes
    left.
    """
    training = [(module, module.training) for module in model.modules()]
    undo: list[tuple[nn.Module, str, Any]] = []
    try:
        model.eval()
        for module in model.modules():
            if conv_forward is not None and isinstance(module, nn.Conv2d):
                _shadow(module, "_conv_forward", functools.partial(conv_forward, module), undo)
            elif frozen_batchnorm and _is_plain_eval_batchnorm(module):
                _shadow(module, "forward", functools.partial(_frozen_batchnorm_forward, module), undo)
        yield model
    finally:
        for module, name, previous in reversed(undo):
            if previous is _MISSING:
                delattr(module, name)
            else:
                object.__setattr__(module, name, previous)
        for module, flag in training:
            module.training = flag


@contextmanager
def peak_backprop(model: nn.Module, mode: PRMMode | str = "probability") -> Iterator[nn.Module]:
    """Scope in which `model` backpropagates peaks: eval mode, and in `probability` mode every `nn.Conv2d`
    with PRM's rule as its backward (forward values unchanged). Any backward taken inside (`.backward()`,
    `torch.autograd.grad`, `torch.func.vjp`) follows the rule; weight gradients, if asked for, are not
    computed for convolutions. On exit, even by an exception, the modules and their training flags are
    restored.

        with peak_backprop(model, "probability"):
            crm = model(images.requires_grad_())       # (B, C, h, w)
            crm[0, c, y, x].backward()                 # images.grad: the peak's response
    """
    mode = check_mode(mode)
    with _patched(model, _probability_conv_forward if mode == "probability" else None):
        yield model


# ------------------------------------------------------------------------------------------------------------
# PRMs


def _check_peaks(images: Tensor, peaks: Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if peaks.ndim != 2 or peaks.shape[1] != 4:
        raise ValueError(f"peaks must be (K, 4) [batch, class, y, x], got shape {tuple(peaks.shape)}")
    if peaks.is_floating_point() or peaks.is_complex():
        raise ValueError(f"peaks must be an integer tensor, got {peaks.dtype}")
    if len(peaks) and (int(peaks[:, 0].min()) < 0 or int(peaks[:, 0].max()) >= len(images)):
        raise ValueError(f"peak batch indices must lie in [0, {len(images)}), got {peaks[:, 0].tolist()}")


def _check_on_grid(peaks: Tensor, crm_up: Tensor) -> None:
    """Peaks inside the up-sampled CRM (B, C, hf, wf), checked once its size is known."""
    limits = torch.tensor(crm_up.shape[1:], device=peaks.device)
    bad = ((peaks[:, 1:] < 0) | (peaks[:, 1:] >= limits)).any(dim=1)
    if bad.any():
        raise ValueError(
            f"peaks {peaks[bad].tolist()} lie outside the up-sampled CRM grid (C, h, w) = {tuple(crm_up.shape[1:])}"
        )


def _cast_state(model: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """The model's floating parameters and buffers cast to `dtype`, by name, for `torch.func.functional_call`;
    empty when they already have it (then the model runs as it is)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    if all(t.dtype == dtype for _, t in named if t.is_floating_point()):
        return {}
    return {name: t.detach().to(dtype) for name, t in named if t.is_floating_point()}


def _finish(grads: Tensor) -> Tensor:
    """Input gradients (..., 3, H, W) -> PRMs (..., H, W): RGB summed, clamped at 0, divided by the max."""
    maps = grads.sum(dim=-3).clamp_min(0)
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))  # an all-zero map stays zero


def _image_groups(counts: list[int], max_images: int) -> list[list[int]]:
    """Images that share one forward and one backward, as lists of image indices; images without peaks are
    skipped.

    A group's vectorised backward runs `max(count) * len(group)` passes, so images join a group only while
    that stays within `_GROUP_SLACK` of the useful passes; sorting by count keeps similar counts together.
    """
    order = sorted((b for b, n in enumerate(counts) if n > 0), key=lambda b: (-counts[b], b))
    groups: list[list[int]] = []
    for b in order:
        group = groups[-1] if groups else None
        if group is not None and len(group) < max_images:
            useful = sum(counts[i] for i in group) + counts[b]
            if counts[group[0]] * (len(group) + 1) <= _GROUP_SLACK * useful:
                group.append(b)
                continue
        groups.append([b])
    return groups


# A CPU pass is sized to about two 448 px images: larger passes leave the caches, smaller ones pay per-op
# overhead that the small feature maps of small images do not hide.
_CPU_PASS_PIXELS = 2 * 448 * 448
_CPU_MAX_CHUNK = 16


def default_chunk_size(device: torch.device | str, image_pixels: int = 448 * 448) -> int:
    """Backward passes to vectorise at once when the caller does not say, for images of `image_pixels` each.

    CUDA: 32, where batching fills the device; bounded for memory. CPU: as many as fit `_CPU_PASS_PIXELS`,
    between 2 and 16. Measured with 2 threads and channels_last (BENCHMARKS.md, "Peak backpropagation"): at
    448 px chunks of 2 beat 4 and 8 on ResNet-50 (6.8 / 7.4 / 8.3 s for 11 peaks); at 128 px, RAN with 17
    peaks on 8 images took 2.22 s with chunks of 2 and 1.70-1.79 s with 8 to 24.
    """
    if torch.device(device).type == "cuda":
        return 32
    return max(2, min(_CPU_MAX_CHUNK, _CPU_PASS_PIXELS // max(1, image_pixels)))


def peak_response_maps(
    model: nn.Module,
    images: Tensor,
    peaks: Tensor,
    sub_pixel_factor: int = 1,
    mode: PRMMode | str = "probability",
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """PRMs of all peaks, batched: `(K, H, W)` float in [0, 1], row k for `peaks[k]`.

    model:  CRM model, images (B, 3, H, W) -> CRMs (B, C, h, w)
    images: (B, 3, H, W); its memory format is kept (channels_last is faster on CPU)
    peaks:  (K, 4) long `[batch, class, y, x]` on the CRM grid up-sampled by `sub_pixel_factor`
    chunk_size: the most per-peak backward passes vectorised at once (peaks x images sharing a forward); it
        bounds memory, since each pass holds its own gradient tensors. None: `default_chunk_size(device, H * W)`.
    dtype: the floating dtype to backpropagate in; None: the images' own. `torch.bfloat16` runs the network on
        bf16 copies of its floating parameters and buffers (the model is not touched): about 1.7x faster on a
        CPU with AVX512-BF16 and on tensor cores, with maps that differ from fp32 by ~1e-3 on average and up to
        ~0.1 at single pixels (BENCHMARKS.md). The maps are returned in the images' dtype.

    Images are grouped (all of them when their peak counts are alike, see `_image_groups`); per group, one
    forward builds the graph, and each chunk of peaks is one `vmap`-ed backward w.r.t. the images only: no
    `.grad` is touched and no weight gradient is computed. In `probability` mode the rule's per-image terms
    come from that forward. Works under `torch.no_grad()` and `torch.inference_mode()` (a Lightning validation
    loop).
    """
    mode = check_mode(mode)
    if chunk_size is None:
        chunk_size = default_chunk_size(images.device, images.shape[-2] * images.shape[-1])
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_peaks(images, peaks)
    peaks = peaks.to(device=images.device, dtype=torch.long)
    num_images, _, height, width = images.shape
    if len(peaks) == 0:
        return images.new_zeros(0, height, width)

    # rank[k]: peak k's position among its image's peaks, i.e. the vmap slot its backward runs in.
    batch_index = peaks[:, 0].tolist()
    counts = [0] * num_images
    rank = []
    for b in batch_index:
        rank.append(counts[b])
        counts[b] += 1
    ranks = torch.tensor(rank, device=images.device)

    state = _cast_state(model, dtype) if dtype is not None else {}

    def crm_up_of(x: Tensor) -> Tensor:  # (b, 3, H, W) -> (b, C, h * f, w * f)
        crms = torch.func.functional_call(model, state, (x,)) if state else model(x)
        return upsample_crm(crms, sub_pixel_factor)

    conv_forward = _probability_conv_forward if mode == "probability" else None
    # inference_mode(False): under inference mode no graph can be built. no_grad: the ordinary autograd
    # records nothing (so no weight-gradient graph), while torch.func.vjp still differentiates w.r.t. its own
    # input.
    with torch.inference_mode(False), torch.no_grad(), _patched(model, conv_forward, frozen_batchnorm=True):
        out = images.new_zeros(len(peaks), height, width)  # allocated here: not an inference tensor
        for group in _image_groups(counts, max_images=chunk_size):
            local = torch.full((num_images,), -1, dtype=torch.long, device=images.device)
            local[group] = torch.arange(len(group), device=images.device)
            x = images[group].to(dtype=dtype or images.dtype, copy=True)  # not an inference tensor, even if `images` is
            crm_up, vjp_fn = torch.func.vjp(crm_up_of, x)
            _check_on_grid(peaks, crm_up)
            members = (local[peaks[:, 0]] >= 0).nonzero(as_tuple=True)[0]  # this group's peaks
            most = max(counts[b] for b in group)
            step = max(1, chunk_size // len(group))
            for start in range(0, most, step):
                width = min(step, most - start)  # the last pass runs only the slots that are left
                rows = members[(ranks[members] >= start) & (ranks[members] < start + width)]
                slot, image = ranks[rows] - start, local[peaks[rows, 0]]
                # Slot j of image i seeds that image's j-th peak of the chunk; slots past its count stay zero.
                seeds = crm_up.new_zeros(width, *crm_up.shape)
                seeds[slot, image, peaks[rows, 1], peaks[rows, 2], peaks[rows, 3]] = 1.0
                (grads,) = torch.func.vmap(vjp_fn)(seeds)  # (width, images, 3, H, W)
                out[rows] = _finish(grads[slot, image].to(out.dtype))
                del grads, seeds
    return out


def peak_response_maps_looped(
    model: nn.Module,
    images: Tensor,
    peaks: Tensor,
    sub_pixel_factor: int = 1,
    mode: PRMMode | str = "probability",
) -> Tensor:
    """Reference PRMs `(K, H, W)` by PRM's official procedure; same contract as `peak_response_maps`.

    One image at a time (batch 1): one forward with the weights as they are (normally requiring grad), then
    per peak one `crm.backward(one_hot, retain_graph=True)` and the PRM read from `image.grad`. Weight
    gradients are computed as the official code does, then every parameter's `.grad` is put back as it was.
    """
    mode = check_mode(mode)
    _check_peaks(images, peaks)
    peaks = peaks.to(device=images.device, dtype=torch.long)
    _, _, height, width = images.shape
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            out = images.new_zeros(len(peaks), height, width)
            with _patched(model, _reference_conv_forward if mode == "probability" else None):
                for b in sorted(set(peaks[:, 0].tolist())):
                    x = images[b : b + 1].clone().requires_grad_(True)
                    crm_up = upsample_crm(model(x), sub_pixel_factor)
                    _check_on_grid(peaks, crm_up)
                    for k in (peaks[:, 0] == b).nonzero(as_tuple=True)[0].tolist():
                        _, c, y, xx = peaks[k].tolist()
                        one_hot = torch.zeros_like(crm_up)
                        one_hot[0, c, y, xx] = 1.0
                        x.grad = None
                        crm_up.backward(one_hot, retain_graph=True)
                        assert x.grad is not None
                        out[k] = _finish(x.grad[0])
                    del crm_up
    finally:
        for p, g in zip(params, saved_grads, strict=True):
            p.grad = g
    return out
