"""ResNet-50 trunk up to `layer4` (stride 32, 2048 channels): the original PRM backbone."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import ResNet50_Weights, resnet50

from ranprm.errors import CheckpointError
from ranprm.models.registry import register_backbone
from ranprm.models.weights import load_backbone_weights, read_state_dict


class ResNetTrunk(nn.Module):
    """torchvision's ResNet-50 without its pooling and fully connected classifier."""

    out_channels = 2048
    stride = 32

    def __init__(self) -> None:
        super().__init__()
        net = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, images: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, 2048, ceil(H/32), ceil(W/32))
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _imagenet_state_dict() -> dict[str, Tensor]:
    weights = ResNet50_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as err:  # offline: URLError, socket errors, hub errors
        hub = torch.hub.get_dir()
        file_name = weights.url.rsplit("/", 1)[-1]
        raise CheckpointError(
            f"backbone.pretrained=imagenet: cannot download {weights.url} ({type(err).__name__}); offline, "
            f"place that file at {hub}/checkpoints/{file_name}, or set backbone.pretrained=/path/to/weights.pth "
            "or backbone.pretrained=false"
        ) from err


@register_backbone("resnet50")
def build_resnet50(pretrained: str | bool | None = False) -> ResNetTrunk:
    """`pretrained`: `imagenet` (torchvision weights), a file path, or false for random weights."""
    trunk = ResNetTrunk()
    if pretrained in (None, False, "false", "none", ""):
        return trunk
    if pretrained == "imagenet":
        load_backbone_weights(trunk, _imagenet_state_dict(), "torchvision ImageNet weights")
    else:
        load_backbone_weights(trunk, read_state_dict(str(pretrained)), str(pretrained))
    return trunk
