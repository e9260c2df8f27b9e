"""A tiny convolutional backbone for tests and quick experiments (milliseconds per step on a CPU)."""

from __future__ import annotations

from torch import Tensor, nn

from ranprm.models.registry import register_backbone
from ranprm.models.weights import load_backbone_weights, read_state_dict


class _Residual(nn.Module):
    """A residual add, so tests of peak backprop see the same op mix as the real backbones."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class TinyBackbone(nn.Module):
    """conv-BN-ReLU stages, each halving the size (stride = 2 ** num_stages), with a residual block each."""

    def __init__(self, width: int = 16, num_stages: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for i in range(num_stages):
            out_ch = width * 2**i
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(),
                _Residual(out_ch),
            ]
            in_ch = out_ch
        self.body = nn.Sequential(*layers)
        self.out_channels = in_ch
        self.stride = 2**num_stages

    def forward(self, images: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, C, ceil(H/stride), ceil(W/stride))
        return self.body(images)


@register_backbone("tiny")
def build_tiny(width: int = 16, num_stages: int = 3, pretrained: str | bool | None = False) -> TinyBackbone:
    net = TinyBackbone(width=width, num_stages=num_stages)
    if pretrained not in (None, False, "false", "none", ""):
        load_backbone_weights(net, read_state_dict(str(pretrained)), str(pretrained))
    return net
