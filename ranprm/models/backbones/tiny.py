"""A tiny convolutional backbone for tests and quick experiments (milliseconds per step on a CPU)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ranprm.models.registry import BackboneConfig, register_backbone


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


@dataclass
class TinyConfig(BackboneConfig):
    """A tiny CNN for tests and smoke runs: `num_stages` stride-2 stages of `width * 2**i` channels."""

    name: str = "tiny"
    width: int = 16
    num_stages: int = 3


@register_backbone("tiny", TinyConfig)
def build_tiny(cfg: TinyConfig) -> TinyBackbone:
    return TinyBackbone(width=cfg.width, num_stages=cfg.num_stages)
