"""RAN's soft-mask attention (Wang et al., CVPR 2017): one implementation, used by RAN and attachable to any trunk.

**The mask branch** (`MaskBranch`), as in the authors' Caffe graph (docs/method.md, "Attention module"): bottom-up
top-down. `num_pools` max-pools down, one pre-activation unit after each; every level but the bottom also feeds a
skip unit; two units at the bottom. Up: a bilinear resize (align_corners=True) to the size of the matching
down-path tensor, plus its skip, one unit; the last resize goes to the branch input's size. Head:
BN-ReLU-1x1-BN-ReLU-1x1-sigmoid gives M in (0, 1), one value per channel and pixel. No size is hard-coded, so any
input size works. The depth follows the stage's stride: 3 / 2 / 1 pools at strides 4 / 8 / 16 bring every mask's
bottom to stride 32 (`pools_for_stride`).

**The output** is `(1 + M) * T` for a trunk tensor T. `mask_grad="detached"` computes `(1 + M.detach()) * T`: the
masks are constants in the backward graph (the RAN-PRM paper's second gradient path for peak backpropagation); it is a
plain attribute, so it can be switched on a trained model without retraining.

**On any trunk** (`AttentionHost.attach_attention`): a mask branch reads the output T of a chosen stage and
replaces it by the attended tensor, through a forward hook on that stage, so the trunk's own parameter names (and
so its pretrained weight files) do not change; the branches live under `attention.<stage>`. They are new layers
on top of a trained trunk, so by default (`attention_init="identity"`) they start as the identity: the branch's
last 1x1 conv is zero, so M = sigmoid(0) = 1/2 everywhere at first, and the output is `(1 + M - 1/2) * T`, i.e.
exactly T at step 0, while M still gets the sigmoid's full gradient (1/4). The alternative, RAN's own form with
a very negative bias so that M ~ 0, starts at T too but in the sigmoid's flat tail (a bias of -10 passes 5e-5 of
the gradient), where a short fine-tune would not move it. The price of the shift is the range: the mask scales T
by 1/2 to 3/2 instead of 1 to 2 (it can damp as well as boost). `attention_init="ran"` keeps RAN's exact form
`(1 + M) * T` and its initialisation, for trunks trained from scratch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ranprm.errors import ConfigError
from ranprm.models.registry import BackboneConfig

MaskGrad = Literal["full", "detached"]
MASK_GRAD_MODES: tuple[str, ...] = ("full", "detached")
AttentionInit = Literal["identity", "ran"]
ATTENTION_INITS: tuple[str, ...] = ("identity", "ran")
ATTENTION_STRIDES: tuple[int, ...] = (4, 8, 16)  # where RAN puts its attention stages
_MASK_BOTTOM_STRIDE = 32  # every mask branch pools down to the trunk's final stride


@dataclass
class TrunkConfig(BackboneConfig):
    """The options every pretrained trunk shares (resnet*, efficientnet_lite*, timm): `output_stride` 32 or 16
    (the last stage dilated instead of strided); `attention`: the strides (4, 8, 16) after whose stage a RAN mask
    branch sits, `attention_init` identity | ran, and `mask_grad` full | detached."""

    output_stride: int = 32
    attention: list[int] = field(default_factory=list)
    attention_init: str = "identity"
    mask_grad: str = "full"


def check_mask_grad(mode: str) -> MaskGrad:
    if mode not in MASK_GRAD_MODES:
        raise ConfigError(f"backbone.mask_grad={mode!r} is not valid; choose one of {list(MASK_GRAD_MODES)}")
    return mode  # type: ignore[return-value]


def pools_for_stride(stride: int) -> int:
    """Max-pools of a mask branch at `stride`: 3 / 2 / 1 at 4 / 8 / 16, so the bottom sits at stride 32."""
    if stride not in ATTENTION_STRIDES:
        raise ConfigError(
            f"backbone.attention: stride {stride} is not one of RAN's attention strides {list(ATTENTION_STRIDES)}"
        )
    return int(math.log2(_MASK_BOTTOM_STRIDE // stride))


def _resize_to(x: Tensor, like: Tensor) -> Tensor:
    """Bilinearly resize `x` (B, C, h, w) to the spatial size of `like` (B, C', H, W), corners aligned."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)


def _pool_down(x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1(C/4)-BN-ReLU-3x3(C/4, stride)-BN-ReLU-1x1(C), plus a shortcut.

    No conv has a bias (each is followed by BN, or by the residual add of a pre-activation net). When the
    channels or the stride change, the shortcut is a 1x1 conv on the pre-activated input, as in the authors'
    graph.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        mid = max(1, out_channels // 4)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s))
        pre = F.relu(self.bn1(x), inplace=True)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        out = self.conv3(F.relu(self.bn3(out), inplace=True))
        identity = x if self.shortcut is None else self.shortcut(pre)
        return out + identity


class MaskBranch(nn.Module):
    """Bottom-up top-down soft mask (see the module docstring): (B, C, H, W) -> M (B, C, H, W) in (0, 1)."""

    def __init__(self, channels: int, num_pools: int) -> None:
        super().__init__()
        if num_pools < 1:
            raise ValueError(f"a mask branch needs at least one pool, got {num_pools}")
        self.down_units = nn.ModuleList(PreActBottleneck(channels, channels) for _ in range(num_pools))
        self.skip_units = nn.ModuleList(PreActBottleneck(channels, channels) for _ in range(num_pools - 1))
        self.bottom_unit = PreActBottleneck(channels, channels)
        self.up_units = nn.ModuleList(PreActBottleneck(channels, channels) for _ in range(num_pools - 1))
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.Sigmoid(),
        )

    @property
    def last_conv(self) -> nn.Conv2d:
        return self.head[5]  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> M (B, C, H, W) in (0, 1)
        skips: list[Tensor] = []
        out = x
        for level, down_unit in enumerate(self.down_units):
            out = down_unit(_pool_down(out))
            if level < len(self.skip_units):
                skips.append(self.skip_units[level](out))
        out = self.bottom_unit(out)
        # Up the levels in reverse: the deepest skip first, each one at its own (possibly odd) size.
        for skip, up_unit in zip(reversed(skips), self.up_units, strict=True):
            out = up_unit(_resize_to(out, skip) + skip)
        return self.head(_resize_to(out, x))


def soft_mask(branch: MaskBranch, x: Tensor, mask_grad: MaskGrad) -> Tensor:
    """M = branch(x); under `detached` computed without a graph (same values as `M.detach()`; building no graph
    also saves the branch's activation memory; BatchNorm still updates its running statistics in training)."""
    if mask_grad == "detached":
        with torch.no_grad():
            return branch(x)
    return branch(x)


def init_conv_and_norm(modules: Iterator[nn.Module]) -> None:
    """RAN's initialisation: Kaiming-normal (fan out) convolutions, BN at weight 1 and bias 0."""
    for module in modules:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class StageAttention(nn.Module):
    """A mask branch over a trunk stage's output T: `(1 + M) * T` (init `ran`) or `(1/2 + M) * T` (init
    `identity`, zero last conv: exactly T at first). See the module docstring for why."""

    def __init__(self, channels: int, stride: int, init: AttentionInit = "identity") -> None:
        super().__init__()
        if init not in ATTENTION_INITS:
            raise ConfigError(f"backbone.attention_init={init!r} is not valid; choose one of {list(ATTENTION_INITS)}")
        self.stride = stride
        self.mask = MaskBranch(channels, pools_for_stride(stride))
        init_conv_and_norm(self.mask.modules())
        self.offset = 1.0
        if init == "identity":
            nn.init.zeros_(self.mask.last_conv.weight)
            self.offset = 0.5  # 1 - sigmoid(0): the output is T while the last conv is zero
        self.mask_grad: MaskGrad = "full"
        self.collected: list[Tensor] | None = None  # set by the host while it collects maps for display

    def forward(self, trunk: Tensor) -> Tensor:  # T (B, C, H, W) -> attended (B, C, H, W)
        mask = soft_mask(self.mask, trunk, self.mask_grad)
        if self.collected is not None:
            self.collected.append(mask.mean(dim=1))
        return (self.offset + mask) * trunk


_STAGE_ATTENTION = "_ranprm_stage_attention"  # the stage module's (unregistered) reference to its branch


def _attend_stage_output(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    """Forward hook of an attended stage. Module-level and reading the branch from the stage's `__dict__` (not a
    closure), so that deepcopy and pickling keep the hook pointing at the copy's own branch."""
    return module.__dict__[_STAGE_ATTENTION](output)


class AttentionHost:
    """Mixin for backbones that carry soft masks: the mask-gradient switch, the maps for the panels, and RAN's
    mask branches attached to chosen stages of a trunk (`attach_attention`).

    The host must be an `nn.Module`. `forward_with_attention(images)` returns the features and one map per
    attention module or stage (the channel mean of its M, (B, h_i, w_i), in forward order).
    """

    _mask_grad: MaskGrad = "full"

    def attach_attention(
        self, stages: Sequence[tuple[str, nn.Module, int, int]], init: AttentionInit, mask_grad: MaskGrad
    ) -> None:
        """`stages`: (name, module, channels, stride) for each stage whose output gets a mask branch. The
        branches become `self.attention[<name, dots as underscores>]` (the trunk's own parameter names do not
        change, so its weight files still load); a forward hook on each stage module attends its output."""
        assert isinstance(self, nn.Module)
        self.attention = nn.ModuleDict()
        for name, module, channels, stride in stages:
            branch = StageAttention(channels, stride, init)
            self.attention[name.replace(".", "_")] = branch
            object.__setattr__(module, _STAGE_ATTENTION, branch)  # not a submodule: no second parameter name
            module.register_forward_hook(_attend_stage_output)
        self.set_mask_grad(mask_grad)

    def stage_attention(self) -> list[StageAttention]:
        attention = getattr(self, "attention", None)
        return list(attention.values()) if attention is not None else []  # type: ignore[arg-type]

    def added_modules(self) -> list[nn.Module]:
        """Modules this backbone adds on top of its trunk (new layers: the optimizer gives them the full lr)."""
        return list(self.stage_attention())

    @property
    def mask_grad(self) -> MaskGrad:
        """`full` or `detached`, shared by every mask of the backbone (see the module docstring)."""
        return self._mask_grad

    @mask_grad.setter
    def mask_grad(self, mode: MaskGrad) -> None:
        self.set_mask_grad(mode)

    def set_mask_grad(self, mode: MaskGrad) -> Any:
        """Switch every mask to `mode` (`full` or `detached`); weights stay. Returns self."""
        self._mask_grad = check_mask_grad(mode)
        for branch in self.stage_attention():
            branch.mask_grad = self._mask_grad
        return self

    def forward_with_attention(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Features (B, C, h, w) and one soft-mask map per attention stage, in forward order: the channel mean
        of its M, (B, h_i, w_i) in [0, 1], at the stage's resolution. The maps stay in the autograd graph under
        `mask_grad="full"`; detach them for display."""
        assert isinstance(self, nn.Module)
        collected: list[Tensor] = []
        branches = self.stage_attention()
        for branch in branches:
            branch.collected = collected
        try:
            return self(images), collected
        finally:
            for branch in branches:
                branch.collected = None
