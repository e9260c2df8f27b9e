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
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ranprm.errors import ConfigError
from ranprm.prm.peaks import upsample_crm
from ranprm.utils.stop import check_stop

PRMMode = Literal["probability", "gradient"]
PRM_MODES: tuple[str, ...] = ("probability", "gradient")
Z_EPS = 1e-10  # the official threshold under which a normaliser counts as zero
# An image joins a group (one shared forward and backward) while the padded slots stay under this share of the
# useful ones: a group's backward runs (its largest peak count) x (its images) passes, padding included.
_GROUP_SLACK = 1.25

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
# A convolution call, as the rule sees it (shared by both implementations)


@dataclass(frozen=True)
class _ConvCall:
    """One `F.conv2d` call with its zero padding made explicit: the convolution computes
    `conv2d(F.pad(x, pre_pad), weight, bias, stride, padding, dilation, groups)`.

    `padding` is symmetric (ph, pw); `pre_pad` (left, right, top, bottom) holds what is not: the extra row/column
    of an even kernel's `padding="same"`, and a constant-zero `F.pad` applied to the input just before the call
    (TensorFlow's "SAME" in timm's `Conv2dSame` and `efficientnet_pytorch`'s static-padding convolutions). Both
    kinds are the convolution's own zero padding, which PRM's rule puts in shifted space (`conv(x - m, W+,
    padding)`): so a TF-"SAME" convolution gets the rule of an `nn.Conv2d` with the same padding.
    """

    x: Tensor
    weight: Tensor
    bias: Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    pre_pad: tuple[int, int, int, int] | None


def _bind(names: tuple[str, ...], defaults: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict:
    """A functional op's arguments by name (positional `args` in the order of `names`), defaults filled in."""
    return {**defaults, **dict(zip(names, args, strict=False)), **kwargs}


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    values = tuple(int(v) for v in value)
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _same_padding(kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, ...]]:
    """Symmetric padding (ph, pw) for `padding='same'`, plus the (left, right, top, bottom) rest that an even
    effective kernel puts at the end (where `F.conv2d` puts it)."""
    totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
    return (totals[0] // 2, totals[1] // 2), (0, totals[1] % 2, 0, totals[0] % 2)


def _conv_call(args: tuple[Any, ...], kwargs: dict[str, Any], zero_padded: Callable[[Tensor], Any]) -> _ConvCall:
    """Bind `F.conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)`'s arguments.
    `zero_padded(x)`: the (unpadded input, pad) pair when `x` came from a constant-zero `F.pad`, else None."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = _bind(names, {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}, args, kwargs)
    x, weight = bound["input"], bound["weight"]
    stride, dilation = _pair(bound["stride"]), _pair(bound["dilation"])
    padding = bound["padding"]
    rest: tuple[int, ...] = (0, 0, 0, 0)
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        padding, rest = _same_padding(tuple(weight.shape[-2:]), dilation)  # type: ignore[arg-type]
    else:
        padding = _pair(padding)
    found = zero_padded(x)
    if found is not None:
        x, outer = found
        rest = tuple(a + b for a, b in zip(rest, outer, strict=True))
    pre_pad = rest if any(rest) else None
    return _ConvCall(x, weight, bias=bound["bias"], stride=stride, padding=padding, dilation=dilation,
                     groups=int(bound["groups"]), pre_pad=pre_pad)  # type: ignore[arg-type]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# Batched path: the rule as one autograd Function whose backward is vmap-friendly


def _output_padding(
    in_hw: Sequence[int], out_hw: Sequence[int], kernel: Sequence[int], call: tuple[Any, ...]
) -> tuple[int, int]:
    """The rows/columns a strided convolution dropped, which `conv_transpose2d` must add back to give the input's
    (padded) size `in_hw`. `call`: (stride, padding, dilation, groups)."""
    stride, padding, dilation, _ = call
    return tuple(  # type: ignore[return-value]
        in_hw[i] - ((out_hw[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1) for i in range(2)
    )


def _input_gradient(
    grad: Tensor, weight: Tensor, call: tuple[Any, ...], output_padding: tuple[int, int], pre_pad: Any
) -> Tensor:
    """A convolution's transposed application to `grad` (its input gradient for `weight`), cropped to the input
    before `pre_pad`. `call`: (stride, padding, dilation, groups).

    Grouped (depthwise) convolutions with a stride run it in fp32 when `grad` is bf16 on a CPU: oneDNN has no
    fast bf16 kernel for them, and the bf16 call took 3-9x as long as casting to fp32 and back (EfficientNet-Lite0's
    stride-2 depthwise layers, BENCHMARKS.md "Peak backpropagation on every family"); stride-1 grouped and dense
    layers are faster in bf16 and keep it.
    """
    stride, padding, dilation, groups = call
    if grad.dtype == torch.bfloat16 and groups > 1 and max(stride) > 1 and grad.device.type == "cpu":
        spread = F.conv_transpose2d(grad.float(), weight.float(), None, stride, padding, output_padding, groups,
                                    dilation).to(grad.dtype)  # fmt: skip
    else:
        spread = F.conv_transpose2d(grad, weight, None, stride, padding, output_padding, groups, dilation)
    if pre_pad is not None:
        left, right, top, bottom = pre_pad
        spread = spread[..., top : spread.shape[-2] - bottom, left : spread.shape[-1] - right]
    return spread


class _GradientConv2d(torch.autograd.Function):
    """`conv2d(F.pad(x, pre_pad), W, b)` forward; the plain input gradient as backward (never W's or b's), through
    `_input_gradient` so that bf16 runs avoid the slow kernels. The batched `gradient` mode uses it."""

    generate_vmap_rule = True

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
    ) -> Tensor:
        return F.conv2d(x if pre_pad is None else F.pad(x, pre_pad), weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, _, stride, padding, dilation, groups, pre_pad = inputs
        ctx.save_for_backward(weight)
        ctx.conv, ctx.pre_pad = (stride, padding, dilation, groups), pre_pad
        in_hw = [n + (0 if pre_pad is None else pre_pad[2 - 2 * i] + pre_pad[3 - 2 * i])
                 for i, n in enumerate(x.shape[-2:])]  # fmt: skip
        ctx.output_padding = _output_padding(in_hw, output.shape[-2:], weight.shape[-2:], ctx.conv)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        nones: tuple[None, ...] = (None,) * 7
        if not ctx.needs_input_grad[0]:
            return (None, *nones)
        (weight,) = ctx.saved_tensors
        return (_input_gradient(grad_out, weight, ctx.conv, ctx.output_padding, ctx.pre_pad), *nones)


def _gradient_conv(call: _ConvCall) -> Tensor:
    return _GradientConv2d.apply(
        call.x, call.weight, call.bias, call.stride, call.padding, call.dilation, call.groups, call.pre_pad
    )


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
        ctx.conv, ctx.pre_pad = (stride, padding, dilation, groups), pre_pad
        ctx.output_padding = _output_padding(shifted.shape[-2:], out.shape[-2:], pos_weight.shape[-2:], ctx.conv)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        nones: tuple[None, ...] = (None,) * 7
        if grad_out is None or not ctx.needs_input_grad[0]:
            return (None, *nones)
        shifted, pos_weight, inv_z = ctx.saved_tensors
        spread = _input_gradient(grad_out * inv_z, pos_weight, ctx.conv, ctx.output_padding, None)
        grad_x = shifted * spread
        if ctx.pre_pad is not None:
            left, right, top, bottom = ctx.pre_pad
            grad_x = grad_x[..., top : grad_x.shape[-2] - bottom, left : grad_x.shape[-1] - right]
        return (grad_x, *nones)


def _probability_conv(call: _ConvCall) -> Tensor:
    """The convolution's output, with the probability rule as its backward."""
    out, *_ = _ProbabilityConv2d.apply(
        call.x, call.weight, call.bias, call.stride, call.padding, call.dilation, call.groups, call.pre_pad
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


def _reference_conv(call: _ConvCall) -> Tensor:
    """The convolution in the official style (batch 1): the forward value is the ordinary convolution, detached;
    the gradient reaches x only through `Z = conv(x - m, W+)`."""
    x, pre_pad = call.x, call.pre_pad
    value = F.conv2d(x if pre_pad is None else F.pad(x, pre_pad), call.weight, call.bias, call.stride, call.padding,
                     call.dilation, call.groups).detach()  # fmt: skip
    m = x.min().detach()  # over the whole tensor, as the official code does: the reference runs batch 1
    shifted = _ShiftGrad.apply(x, m) - m
    if pre_pad is not None:
        shifted = F.pad(shifted, pre_pad)
    z = F.conv2d(shifted, F.relu(call.weight).detach(), None, call.stride, call.padding, call.dilation, call.groups)
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


def _frozen_batch_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """`F.batch_norm`'s output through `_FrozenBatchNorm` when it normalises with running statistics (eval mode);
    None otherwise (training-mode statistics keep the ordinary op)."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    bound = _bind(names, {"weight": None, "bias": None, "training": False, "eps": 1e-5}, args, kwargs)
    if bound["training"] or bound["running_mean"] is None or bound["running_var"] is None:
        return None
    out, _ = _FrozenBatchNorm.apply(bound["input"], bound["running_mean"], bound["running_var"], bound["weight"],
                                    bound["bias"], bound["eps"])  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------------------
# Scoped interception

# Convolutions PRM's rule does not cover: a model that runs one inside peak backprop is refused, naming the layer,
# rather than silently getting the plain gradient there.
_UNCOVERED_CONVOLUTIONS = frozenset(
    {
        F.conv1d,
        F.conv3d,
        F.conv_transpose1d,
        F.conv_transpose2d,
        F.conv_transpose3d,
        torch.convolution,
        torch._convolution,
        torch.conv_tbc,
    }  # fmt: skip
)


# The probability rules: a convolution they do not reach would silently get the plain gradient instead.
_RULES_NEEDING_COVERAGE = (_probability_conv, _reference_conv)


class _RuleMode(TorchFunctionMode):
    """While one of `model`'s modules runs: every `F.conv2d` call goes through `conv_rule`, and, with
    `frozen_batchnorm`, every eval-mode `F.batch_norm` through `_FrozenBatchNorm`. Under a probability rule other
    convolution ops (transposed, 1-D, 3-D) raise a ConfigError naming the layer: they would silently get the plain
    gradient.

    Intercepting the functional call rather than `nn.Conv2d`'s method covers every 2-D convolution a trunk runs:
    `nn.Conv2d` and its subclasses, and the layers that call `F.conv2d` themselves (timm's `Conv2dSame` and
    `StdConv2d`, `efficientnet_pytorch`'s static-padding convolutions, ...). A constant-zero `F.pad` whose output
    goes straight into a convolution counts as that convolution's padding (see `_ConvCall`). Calls made while
    none of the model's modules runs (the caller's own code, the backward pass) pass through untouched.
    """

    def __init__(self, model: nn.Module, conv_rule: Callable[[_ConvCall], Tensor] | None, frozen_batchnorm: bool):
        super().__init__()
        self.conv_rule, self.frozen_batchnorm = conv_rule, frozen_batchnorm
        self.running: list[str] = []  # names of the model's modules now running, innermost last
        self._zero_pads: dict[int, tuple[weakref.ref, Tensor, tuple[int, int, int, int]]] = {}
        self._hooks = []
        for name, module in model.named_modules():
            self._hooks.append(module.register_forward_pre_hook(functools.partial(self._enter, name or "<model>")))
            self._hooks.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, name: str, module: nn.Module, args: Any) -> None:
        self.running.append(name)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.running.pop()

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._zero_pads.clear()

    def _zero_padded(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int, int]] | None:
        found = self._zero_pads.get(id(x))
        return (found[1], found[2]) if found is not None and found[0]() is x else None

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not self.running:
            return func(*args, **kwargs)
        if self.conv_rule is not None:
            if func is F.conv2d:
                return self.conv_rule(_conv_call(args, kwargs, self._zero_padded))
            if func is F.pad:
                out = func(*args, **kwargs)
                self._remember_zero_pad(out, args, kwargs)
                return out
            if func in _UNCOVERED_CONVOLUTIONS and self.conv_rule in _RULES_NEEDING_COVERAGE:
                raise ConfigError(
                    f"prm.mode=probability: layer {self.running[-1]!r} runs {getattr(func, '__name__', func)}, "
                    "which PRM's rule does not cover (2-D convolutions only); use prm.mode=gradient or a backbone "
                    "without it"
                )
        if self.frozen_batchnorm and func is F.batch_norm:
            out = _frozen_batch_norm(args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)

    def _remember_zero_pad(self, out: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = _bind(("input", "pad", "mode", "value"), {"mode": "constant", "value": None}, args, kwargs)
        pad = tuple(int(p) for p in bound["pad"])
        if bound["mode"] == "constant" and not bound["value"] and len(pad) == 4 and min(pad) >= 0 and out.ndim == 4:
            self._zero_pads[id(out)] = (weakref.ref(out), bound["input"], pad)  # type: ignore[assignment]


@contextmanager
def _patched(
    model: nn.Module, conv_rule: Callable[[_ConvCall], Tensor] | None, frozen_batchnorm: bool = False
) -> Iterator[_RuleMode]:
    """Eval mode, and while the model runs, every 2-D convolution through `conv_rule` (if given) and, with
    `frozen_batchnorm`, every eval BN through `_FrozenBatchNorm` (see `_RuleMode`). Enter the returned mode
    (`with mode:`) around the forward. Everything is undone in `finally`, so an exception inside the block leaves
    the model as it was: same training flags, no hooks left."""
    training = [(module, module.training) for module in model.modules()]
    mode = _RuleMode(model, conv_rule, frozen_batchnorm)
    try:
        model.eval()
        yield mode
    finally:
        mode.remove_hooks()
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
    with _patched(model, _probability_conv if mode == "probability" else None) as rules, rules:
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


def _zeros_like_layout(crm_up: Tensor, width: int) -> Tensor:
    """Zeros (width, *crm_up.shape) in crm_up's memory layout: channels-last seeds keep every gradient of the
    vectorised backward channels-last, like the forward's activations (mixed layouts cost copies and slow
    kernels)."""
    if crm_up.dim() == 4 and crm_up.is_contiguous(memory_format=torch.channels_last) and not crm_up.is_contiguous():
        b, c, h, w = crm_up.shape
        return crm_up.new_zeros(width, b, h, w, c).permute(0, 1, 4, 2, 3)
    return crm_up.new_zeros(width, *crm_up.shape)


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
        with rules:  # the rule applies to the forward; the vmap-ed backward then follows it
            crms = torch.func.functional_call(model, state, (x,)) if state else model(x)
        return upsample_crm(crms, sub_pixel_factor)

    conv_rule = _probability_conv if mode == "probability" else _gradient_conv
    # inference_mode(False): under inference mode no graph can be built. no_grad: the ordinary autograd
    # records nothing (so no weight-gradient graph), while torch.func.vjp still differentiates w.r.t. its own
    # input.
    with torch.inference_mode(False), torch.no_grad(), _patched(model, conv_rule, frozen_batchnorm=True) as rules:
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
                check_stop()  # a chunk of PRMs can take seconds: a stop signal is answered between chunks
                width = min(step, most - start)  # the last pass runs only the slots that are left
                rows = members[(ranks[members] >= start) & (ranks[members] < start + width)]
                slot, image = ranks[rows] - start, local[peaks[rows, 0]]
                # Slot j of image i seeds that image's j-th peak of the chunk; slots past its count stay zero.
                seeds = _zeros_like_layout(crm_up, width)
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
            with _patched(model, _reference_conv if mode == "probability" else None) as rules, rules:
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
