"""The PRM network: a registered backbone plus a 1x1 class convolution that produces class response maps."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ranprm.errors import DataError
from ranprm.models.registry import build_backbone


class PRMNet(nn.Module):
    """images (B, 3, H, W) -> class response maps (B, C, ceil(H/stride), ceil(W/stride)), raw logits."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes, kernel_size=1, bias=True)

    @classmethod
    def from_config(cls, backbone_cfg: dict[str, Any], num_classes: int) -> PRMNet:
        cfg = dict(backbone_cfg)
        return cls(build_backbone(cfg.pop("name"), **cfg), num_classes)

    @property
    def stride(self) -> int:
        return int(self.backbone.stride)

    def _check_size(self, images: Tensor) -> None:
        # Below one output stride the CRM is a single cell of mostly padding: no peak can mean anything.
        h, w = images.shape[-2:]
        if min(h, w) < self.stride:
            raise DataError(
                f"an image of {w}x{h} px is smaller than the network stride ({self.stride} px); "
                f"use data.image_size >= {self.stride} or larger images"
            )

    def forward(self, images: Tensor) -> Tensor:
        self._check_size(images)
        return self.classifier(self.backbone(images))

    def forward_with_attention(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """CRMs and the backbone's attention maps (an empty list for backbones without attention)."""
        self._check_size(images)
        if hasattr(self.backbone, "forward_with_attention"):
            features, attention = self.backbone.forward_with_attention(images)
            return self.classifier(features), attention
        return self(images), []
