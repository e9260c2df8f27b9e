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
computes `(1 + M.detach()) * T`: the soft masks are constants in the backward graph (the RAN-PRM paper's second
gradient path for peak backpropagation). The mode is a plain attribute, so it can be switched on a trained
model (`set_mask_grad`) with no retraining; the weights are the same in both modes.

The units and the mask branch are `ranprm.models.attention`'s, the same ones `backbone.attention` attaches to
other trunks. No public ImageNet weights exist for RAN (neither timm nor torchvision has it), so `pretrained`
is a file path or off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from ranprm.errors import ConfigError, DataError
from ranprm.models.attention import (
    AttentionHost,
    MaskBranch,
    MaskGrad,
    PreActBottleneck,
    check_mask_grad,
    init_conv_and_norm,
    pools_for_stride,
    soft_mask,
)
from ranprm.models.registry import BackboneConfig, register_backbone

MIN_INPUT_SIZE = 32

# Max-pools in the mask branch of each attention stage (docs/method.md, RAN): the stages work at strides 4, 8 and
# 16, so 3 / 2 / 1 pools bring every mask bottom to stride 32.
_STAGE_STRIDES: tuple[int, int, int] = (4, 8, 16)
_STAGE_MULTIPLIERS: tuple[int, int, int, int] = (4, 8, 16, 32)  # stage channels = width * multiplier
_FINAL_UNITS = 3  # plain units at 2048 channels after the attention stages


class AttentionModule(nn.Module):
    """Attention module, p=1, t=2, r=1: pre unit, trunk (2 units) and soft mask, `(1 + M) * T`, post unit."""

    def __init__(self, channels: int, num_pools: int, mask_grad: MaskGrad = "full") -> None:
        super().__init__()
        self.pre_unit = PreActBottleneck(channels, channels)
        self.trunk = nn.Sequential(PreActBottleneck(channels, channels), PreActBottleneck(channels, channels))
        self.mask = MaskBranch(channels, num_pools)
        self.post_unit = PreActBottleneck(channels, channels)
        self.mask_grad: MaskGrad = check_mask_grad(mask_grad)

    def forward(self, x: Tensor, attention_maps: list[Tensor] | None = None) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W). `attention_maps`, when given, receives M's channel mean (B, H, W)."""
        x = self.pre_unit(x)
        trunk = self.trunk(x)
        mask = soft_mask(self.mask, x, self.mask_grad)
        if attention_maps is not None:
            attention_maps.append(mask.mean(dim=1))
        return self.post_unit((1 + mask) * trunk)


class ResidualAttentionNet(AttentionHost, nn.Module):
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
        mask_grad = check_mask_grad(mask_grad)
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
        for stage, (out_ch, num_modules, stride) in enumerate(
            zip(channels[:3], modules_per_stage, _STAGE_STRIDES, strict=True)
        ):
            blocks: list[nn.Module] = [PreActBottleneck(in_ch, out_ch, stride=1 if stage == 0 else 2)]
            blocks += [AttentionModule(out_ch, pools_for_stride(stride), mask_grad) for _ in range(num_modules)]
            stages.append(nn.ModuleList(blocks))
            in_ch = out_ch
        self.stage1, self.stage2, self.stage3 = stages
        final = [PreActBottleneck(in_ch, channels[3], stride=2)]
        final += [PreActBottleneck(channels[3], channels[3]) for _ in range(_FINAL_UNITS - 1)]
        self.stage4 = nn.Sequential(*final)
        # Pre-activation units leave their output un-normalised; the authors' graph closes with BN-ReLU before
        # pooling, and the PRM class conv expects rectified features like ResNet-50's.
        self.final_norm = nn.Sequential(nn.BatchNorm2d(channels[3]), nn.ReLU(inplace=True))
        init_conv_and_norm(self.modules())
        self.set_mask_grad(mask_grad)

    def attention_modules(self) -> list[AttentionModule]:
        """Every attention module, in forward order."""
        return [m for m in self.modules() if isinstance(m, AttentionModule)]

    def set_mask_grad(self, mode: MaskGrad) -> ResidualAttentionNet:
        """Switch every attention module to `mode` (`full` or `detached`); weights stay. Returns self."""
        self._mask_grad = check_mask_grad(mode)
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


@dataclass
class RANConfig(BackboneConfig):
    """Attention-56: `width` stem channels (stages use 4/8/16/32x), `modules_per_stage` attention modules in
    stages 1-3, `mask_grad` full | detached (switchable on a trained model). No public ImageNet weights exist for
    RAN (neither timm nor torchvision has it): `pretrained` is a weight file or off."""

    name: str = "ran"
    mask_grad: str = "full"
    width: int = 64
    modules_per_stage: list[int] = field(default_factory=lambda: [1, 1, 1])


@dataclass
class RAN92Config(RANConfig):
    """Attention-92: as `ran` with 1, 2, 3 attention modules in stages 1-3."""

    name: str = "ran92"
    modules_per_stage: list[int] = field(default_factory=lambda: [1, 2, 3])


@register_backbone("ran", RANConfig)
@register_backbone("ran92", RAN92Config)
def build_ran(cfg: RANConfig) -> ResidualAttentionNet:
    return ResidualAttentionNet(
        width=cfg.width,
        modules_per_stage=cfg.modules_per_stage,
        mask_grad=cfg.mask_grad,  # type: ignore[arg-type]
    )
