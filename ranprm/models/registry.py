"""Backbone registry: every backbone is a name, a factory, and the same small API.

A backbone is an `nn.Module` with
- `forward(images: Tensor (B, 3, H, W)) -> Tensor (B, out_channels, h, w)`;
- `out_channels: int` and `stride: int` (the output is `ceil(H / stride)` by `ceil(W / stride)` or documented);
- optionally `forward_with_attention(images) -> (features, list[Tensor (B, h_i, w_i)])` for backbones that have
  attention masks to show (RAN).

Adding a backbone is one module under `ranprm.models.backbones` that decorates its factory with
`@register_backbone("name")`, plus one YAML under `conf/backbone/`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ranprm.errors import ConfigError

BackboneFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register `factory` under `name`; a second registration of the same name is a bug."""

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(name: str, **cfg: Any) -> nn.Module:
    """Build the backbone registered as `name` with keyword options `cfg`."""
    if name not in _REGISTRY:
        raise ConfigError(f"backbone.name={name!r} is not a known backbone; choose one of {available_backbones()}")
    module = _REGISTRY[name](**cfg)
    for attr in ("out_channels", "stride"):
        if not isinstance(getattr(module, attr, None), int):
            raise TypeError(f"backbone {name!r} must define an int attribute {attr!r}")
    return module
