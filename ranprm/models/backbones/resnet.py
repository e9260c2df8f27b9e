"""torchvision ResNets up to `layer4` (stride 32, or 16 with `output_stride=16`): `resnet50` is the original PRM
backbone, `resnet101` its deeper sibling.

`pretrained=imagenet` loads torchvision's ImageNet weights named by `weights`: `IMAGENET1K_V1` (the original
torchvision weights, which PRM fine-tuned; the default) or `IMAGENET1K_V2` (torchvision's newer recipe, 80.9% /
81.9% top-1 for ResNet-50 / 101 against 76.1% / 77.4%). They are downloaded when online and cached by torch.hub;
offline, the one-line error says where to put the file.

`output_stride=16` dilates `layer4` instead of striding it (torchvision's `replace_stride_with_dilation`): class
maps twice as fine for 4x the cost of `layer4`. `attention=[4, 8, 16]` (any subset) puts RAN's mask branch on the
output of `layer1` / `layer2` / `layer3` (`ranprm.models.attention`). The state-dict keys are torchvision's
(`conv1.weight`, `layer1.0.conv1.weight`, ...) minus `fc`, so torchvision weight files load as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision
from torch import Tensor, nn

from ranprm.errors import CheckpointError, ConfigError
from ranprm.models.attention import AttentionHost, TrunkConfig
from ranprm.models.registry import StateDict, register_backbone

_STAGES = {4: "layer1", 8: "layer2", 16: "layer3"}  # stride -> the stage whose output has it


@dataclass
class ResNetConfig(TrunkConfig):
    """torchvision ResNet-50 up to layer4. `weights`: torchvision's ImageNet weights for `pretrained=imagenet`
    (IMAGENET1K_V1, as PRM used, or IMAGENET1K_V2); the trunk options of `TrunkConfig`."""

    name: str = "resnet50"
    weights: str = "IMAGENET1K_V1"


@dataclass
class ResNet101Config(ResNetConfig):
    """torchvision ResNet-101 up to layer4; options as `resnet50`."""

    name: str = "resnet101"


class ResNetTrunk(AttentionHost, nn.Module):
    """A torchvision ResNet without its pooling and fully connected classifier."""

    out_channels = 2048

    def __init__(
        self,
        arch: str = "resnet50",
        output_stride: int = 32,
        attention: list[int] | tuple[int, ...] = (),
        attention_init: str = "identity",
        mask_grad: str = "full",
    ) -> None:
        super().__init__()
        if output_stride not in (16, 32):
            raise ConfigError(f"backbone.output_stride={output_stride} is not supported by {arch}; use 32 or 16")
        net = torchvision.models.get_model(
            arch, weights=None, replace_stride_with_dilation=[False, False, output_stride == 16]
        )
        self.stride = output_stride
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        stages = []
        for stride in sorted(set(attention)):
            if stride not in _STAGES:
                raise ConfigError(f"backbone.attention: stride {stride} is not one of {sorted(_STAGES)} for {arch}")
            layer = getattr(self, _STAGES[stride])
            stages.append((_STAGES[stride], layer, layer[-1].bn3.num_features, stride))
        self.attach_attention(stages, attention_init, mask_grad)  # type: ignore[arg-type]

    def forward(self, images: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, 2048, ceil(H/s), ceil(W/s))
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _imagenet_state_dict(cfg: ResNetConfig) -> StateDict:
    """torchvision's weights named by `cfg.weights`, downloaded (or read from torch.hub's cache)."""
    enum = torchvision.models.get_model_weights(cfg.name)
    if cfg.weights not in enum.__members__:
        raise ConfigError(
            f"backbone.weights={cfg.weights!r} is not a torchvision weight set of {cfg.name}; "
            f"choose one of {[w for w in enum.__members__ if w != 'DEFAULT']}"
        )
    weights = enum[cfg.weights]
    try:
        return weights.get_state_dict(progress=False)
    except Exception as err:  # offline: URLError, socket errors, hub errors
        file_name = weights.url.rsplit("/", 1)[-1]
        raise CheckpointError(
            f"backbone.pretrained=imagenet: cannot download {weights.url} ({type(err).__name__}); offline, "
            f"place that file at {torch.hub.get_dir()}/checkpoints/{file_name}, or set "
            "backbone.pretrained=/path/to/weights.pth or backbone.pretrained=false"
        ) from err


@register_backbone("resnet50", ResNetConfig, imagenet=_imagenet_state_dict)
@register_backbone("resnet101", ResNet101Config, imagenet=_imagenet_state_dict)
def build_resnet(cfg: ResNetConfig) -> ResNetTrunk:
    return ResNetTrunk(cfg.name, cfg.output_stride, cfg.attention, cfg.attention_init, cfg.mask_grad)
