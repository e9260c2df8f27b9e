"""Residual Attention Network (Wang et al., CVPR 2017) as a fully convolutional PRM backbone.

`ran` is Attention-56 and `ran92` is Attention-92, following the authors' Caffe graph (see docs/method.md):

    stem: conv7x7/2 (64) - BN - ReLU - maxpool3x3/2                       stride 4
    stage 1: unit -> 256,        attention modules (3 mask pools, 2 skips)  stride 4
    stage 2: unit -> 512 /2,     attention modules (2 mask pools, 1 skip)   stride 8
    stage 3: unit -> 1024 /2,    attention modules (1 mask pool, 0 skips)   stride 16
    stage 4: unit -> 2048 /2, two more units at 2048, BN - ReLU            stride 32

Attention-56 has 1, 1, 1 attention modules in stages 1-3 and Attention-92 has 1, 2, 3. There is no
classifier: the PRM peak head sits on the 2048-channel output.

**Output size.** Every stride-2 layer (the stem conv, the stem pool, the three stride-2 units) pads so
that it maps a side of n to ceil(n / 2); five of them give `ceil(H / 32)` by `ceil(W / 32)`:
448 -> 14, 321 -> 11, 500 -> 16, 97 -> 4, 131 -> 5, 64 -> 2. The mask branch pools the same way and
resizes back to the exact size of the tensor it is added to, so no size is hard-coded and any input of at
least 32 px per side works. Smaller inputs raise `DataError`: an image smaller than one output stride is
mostly padding by the last stage, and its single output cell is not a meaningful response map.

**Soft-mask gradient.** An attention module outputs `(1 + M) * T`. With `mask_grad="detached"` it
computes `(1 + M.detach()) * T`: the soft masks are constants in the backward graph (the seed's second
gradient path for peak backpropagation). The mode is a plain attribute, so it can be switched on a trained
model (`set_mask_grad`) with no retraining; the weights are the same in both modes.

No public ImageNet weights exist for RAN (neither timm nor torchvision has it), so `pretrained` is a file
path or nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ranprm.errors import CheckpointError, ConfigError, DataError
from ranprm.models.registry import register_backbone
from ranprm.models.weights import load_backbone_weights, read_state_dict

MaskGrad = Literal["full", "detached"]
MASK_GRAD_MODES: tuple[str, ...] = ("full", "detached")
MIN_INPUT_SIZE = 32

# Max-pools in the mask branch of each attention stage (docs/method.md, RAN); each stage has one skip unit
# fewer. The stages work at strides 4, 8 and 16, so 3 / 2 / 1 pools bring every mask bottom to stride 32.
_MASK_POOLS: tuple[int, int, int] = (3, 2, 1)
_STAGE_MULTIPLIERS: tuple[int, int, int, int] = (4, 8, 16, 32)  # stage channels = width * multiplier
_FINAL_UNITS = 3  # plain units at 2048 channels after the attention stages


def _check_mask_grad(mode: str) -> MaskGrad:
    if mode not in MASK_GRAD_MODES:
        raise ConfigError(f"backbone.mask_grad={mode!r} is not valid; choose one of {list(MASK_GRAD_MODES)}")
    return mode  # type: ignore[return-value]


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
        mid = out_channels // 4
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
    """Bottom-up top-down soft mask: `num_pools` max-pools down, back up by bilinear resizes, sigmoid head.

    Down: after each pool one unit; every level but the bottom also feeds a skip unit. The bottom level has
    two units. Up: resize to the skip tensor's size, add the skip unit's output, one unit. The last resize
    goes to the size of the branch input (= the trunk's size), then BN-ReLU-1x1-BN-ReLU-1x1-sigmoid gives M
    in (0, 1).
    """

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


class AttentionModule(nn.Module):
    """Attention module, p=1, t=2, r=1: pre unit, trunk (2 units) and soft mask, `(1 + M) * T`, post unit."""

    def __init__(self, channels: int, num_pools: int, mask_grad: MaskGrad = "full") -> None:
        super().__init__()
        self.pre_unit = PreActBottleneck(channels, channels)
        self.trunk = nn.Sequential(PreActBottleneck(channels, channels), PreActBottleneck(channels, channels))
        self.mask = MaskBranch(channels, num_pools)
        self.post_unit = PreActBottleneck(channels, channels)
        self.mask_grad: MaskGrad = _check_mask_grad(mask_grad)

    def forward(self, x: Tensor, attention_maps: list[Tensor] | None = None) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W). `attention_maps`, when given, receives M's channel mean (B, H, W)."""
        x = self.pre_unit(x)
        trunk = self.trunk(x)
        if self.mask_grad == "detached":
            # Same values as `M.detach()`; building no graph for the branch also saves its activation memory.
            # BatchNorm still updates its running statistics in training mode.
            with torch.no_grad():
                mask = self.mask(x)
        else:
            mask = self.mask(x)
        if attention_maps is not None:
            attention_maps.append(mask.mean(dim=1))
        return self.post_unit((1 + mask) * trunk)


class ResidualAttentionNet(nn.Module):
    """RAN trunk without its classifier: (B, 3, H, W) -> (B, 32 * width, ceil(H/32), ceil(W/32)).

    `width` is the stem's channel count (64 in the paper; stage channels are 4/8/16/32 times it) and
    `modules_per_stage` the number of attention modules in stages 1-3: (1, 1, 1) for Attention-56,
    (1, 2, 3) for Attention-92. Small values build a tiny RAN from the same code for tests.
    """

    stride = 32

    def __init__(
        self,
        width: int = 64,
        modules_per_stage: Sequence[int] = (1, 1, 1),
        mask_grad: MaskGrad = "full",
    ) -> None:
        super().__init__()
        modules_per_stage = tuple(int(n) for n in modules_per_stage)
        if int(width) < 4 or int(width) % 4:
            raise ConfigError(f"backbone.width={width!r} must be a positive multiple of 4 (units use C/4)")
        if len(modules_per_stage) != 3 or min(modules_per_stage) < 0:
            raise ConfigError(
                f"backbone.modules_per_stage={list(modules_per_stage)} must be 3 counts >= 0 (stages 1-3)"
            )
        width = int(width)
        mask_grad = _check_mask_grad(mask_grad)
        channels = [width * m for m in _STAGE_MULTIPLIERS]
        self.out_channels: int = channels[-1]
        self.width = width
        self.modules_per_stage = modules_per_stage

        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        in_ch = width
        stages: list[nn.ModuleList] = []
        for stage, (out_ch, num_modules, num_pools) in enumerate(
            zip(channels[:3], modules_per_stage, _MASK_POOLS, strict=True)
        ):
            blocks: list[nn.Module] = [PreActBottleneck(in_ch, out_ch, stride=1 if stage == 0 else 2)]
            blocks += [AttentionModule(out_ch, num_pools, mask_grad) for _ in range(num_modules)]
            stages.append(nn.ModuleList(blocks))
            in_ch = out_ch
        self.stage1, self.stage2, self.stage3 = stages
        final = [PreActBottleneck(in_ch, channels[3], stride=2)]
        final += [PreActBottleneck(channels[3], channels[3]) for _ in range(_FINAL_UNITS - 1)]
        self.stage4 = nn.Sequential(*final)
        # Pre-activation units leave their output un-normalised; the authors' graph closes with BN-ReLU before
        # pooling, and the PRM class conv expects rectified features like ResNet-50's.
        self.final_norm = nn.Sequential(nn.BatchNorm2d(channels[3]), nn.ReLU(inplace=True))
        self._init_weights()
        self.set_mask_grad(mask_grad)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def attention_modules(self) -> list[AttentionModule]:
        """Every attention module, in forward order."""
        return [m for m in self.modules() if isinstance(m, AttentionModule)]

    @property
    def mask_grad(self) -> MaskGrad:
        """`full` or `detached`, shared by every attention module (see the module docstring)."""
        return self._mask_grad

    @mask_grad.setter
    def mask_grad(self, mode: MaskGrad) -> None:
        self.set_mask_grad(mode)

    def set_mask_grad(self, mode: MaskGrad) -> ResidualAttentionNet:
        """Switch every attention module to `mode` (`full` or `detached`); weights stay. Returns self."""
        self._mask_grad: MaskGrad = _check_mask_grad(mode)
        for module in self.attention_modules():
            module.mask_grad = self._mask_grad
        return self

    def forward(self, images: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, out_channels, ceil(H/32), ceil(W/32))
        return self._forward(images, None)

    def forward_with_attention(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Features (B, out_channels, h, w) and one soft-mask map per attention module, in forward order.

        Each map is the channel mean of that module's M, (B, h_i, w_i) in [0, 1], at the module's own
        resolution (stride 4, 8 or 16). It stays in the autograd graph under `mask_grad="full"`; detach it
        for display.
        """
        attention_maps: list[Tensor] = []
        features = self._forward(images, attention_maps)
        return features, attention_maps

    def _forward(self, images: Tensor, attention_maps: list[Tensor] | None) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise DataError(f"RAN backbone expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE:
            raise DataError(
                f"image of {height}x{width} px is too small for the RAN backbone: it needs at least "
                f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} px (stride {self.stride})"
            )
        x = self.stem(images)
        for stage in (self.stage1, self.stage2, self.stage3):
            for block in stage:
                x = block(x, attention_maps) if isinstance(block, AttentionModule) else block(x)
        return self.final_norm(self.stage4(x))


def _build(
    name: str,
    default_modules: tuple[int, int, int],
    pretrained: str | bool | None,
    mask_grad: MaskGrad,
    width: int,
    modules_per_stage: Sequence[int] | None,
) -> ResidualAttentionNet:
    if pretrained is True or (isinstance(pretrained, str) and pretrained.lower() == "imagenet"):
        raise CheckpointError(
            f"backbone.pretrained=imagenet: no public ImageNet weights exist for {name} (Residual Attention "
            "Network); set backbone.pretrained=/path/to/weights.pth or backbone.pretrained=null"
        )
    net = ResidualAttentionNet(
        width=width,
        modules_per_stage=default_modules if modules_per_stage is None else modules_per_stage,
        mask_grad=mask_grad,
    )
    if pretrained not in (None, False, "false", "none", "null", ""):
        load_backbone_weights(net, read_state_dict(str(pretrained)), str(pretrained))
    return net


@register_backbone("ran")
def build_ran(
    pretrained: str | bool | None = None,
    mask_grad: MaskGrad = "full",
    width: int = 64,
    modules_per_stage: Sequence[int] | None = None,
) -> ResidualAttentionNet:
    """Attention-56 (modules per stage 1, 1, 1). `pretrained`: a weight file path, or None/false."""
    return _build("ran", (1, 1, 1), pretrained, mask_grad, width, modules_per_stage)


@register_backbone("ran92")
def build_ran92(
    pretrained: str | bool | None = None,
    mask_grad: MaskGrad = "full",
    width: int = 64,
    modules_per_stage: Sequence[int] | None = None,
) -> ResidualAttentionNet:
    """Attention-92 (modules per stage 1, 2, 3). `pretrained`: a weight file path, or None/false."""
    return _build("ran92", (1, 2, 3), pretrained, mask_grad, width, modules_per_stage)
