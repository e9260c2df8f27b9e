"""Backbone registry: every backbone is a name, a typed config, a factory, and the same small API.

A backbone is an `nn.Module` with
- `forward(images: Tensor (B, 3, H, W)) -> Tensor (B, out_channels, h, w)`, images normalised with ImageNet's
  mean and std (the data pipeline's convention; a trunk whose weights expect another converts inside);
- `out_channels: int` and `stride: int` (the output is about `ceil(H / stride)` by `ceil(W / stride)`);
- optionally `forward_with_attention(images) -> (features, list[Tensor (B, h_i, w_i)])` and `set_mask_grad` for
  backbones with soft masks (RAN, or any trunk with `attention`), and `added_modules()`: layers added on top of
  a trunk, which the optimizer trains at the full learning rate.

**Adding a backbone is one new file** under `ranprm/models/backbones/` (imported automatically) or in a module named
in `RANPRM_PLUGINS`:

    @dataclass
    class ToyConfig(BackboneConfig):
        name: str = "toy"
        width: int = 8

    @register_backbone("toy", ToyConfig)
    def build_toy(cfg: ToyConfig) -> nn.Module: ...

The config dataclass makes `backbone=toy backbone.width=16` work on the command line, with its types checked
when the config is composed. No YAML is needed: the dataclass is the one place for the options and defaults.

**`backbone.pretrained` is handled here, once**, for every backbone (`parse_pretrained`): off (`null`, `false`,
`none`, `no`, `off`, `0` or empty), `imagenet` (or `true`: the family's own ImageNet weights, when it has any),
or the path of a weight file (a bare state dict, a classifier's state dict, a ranprm or Lightning checkpoint;
`.safetensors` too). A backbone only says where its ImageNet weights come from (`imagenet=`) and, when files
come in a foreign key format, how to convert them (`convert=`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from torch import Tensor, nn

from ranprm.errors import CheckpointError, ConfigError
from ranprm.models.weights import load_backbone_weights, read_state_dict
from ranprm.utils.registry import Registry

StateDict = dict[str, Tensor]
C = TypeVar("C")

_OFF = frozenset({"", "false", "none", "null", "no", "off", "0"})
_IMAGENET = frozenset({"imagenet", "true"})


@dataclass
class BackboneConfig:
    """Options every backbone has. Subclasses set `name` to their registry name and add their own fields."""

    name: str = ""
    pretrained: str | None = None  # off | imagenet | /path/to/weights (see the module docstring)


@dataclass(frozen=True)
class Pretrained:
    """A parsed `backbone.pretrained`: `kind` off / imagenet / file, with the file's path."""

    kind: Literal["off", "imagenet", "file"]
    path: Path | None = None


def parse_pretrained(value: object) -> Pretrained:
    """The one reading of `backbone.pretrained` (bools, None and strings alike; case-insensitive keywords)."""
    if value is None or value is False:
        return Pretrained("off")
    if value is True:
        return Pretrained("imagenet")
    if not isinstance(value, str | Path):
        raise ConfigError(
            f"backbone.pretrained={value!r} is not valid; use imagenet, false or the path of a weight file"
        )
    text = str(value).strip()
    if text.lower() in _OFF:
        return Pretrained("off")
    if text.lower() in _IMAGENET:
        return Pretrained("imagenet")
    return Pretrained("file", Path(text).expanduser())


@dataclass(frozen=True)
class BackboneSpec(Generic[C]):
    """What the registry holds for a backbone: the factory (config -> module with its initial weights), where
    its ImageNet weights come from (config -> state dict in any format `convert` reads; None: it has none), and
    how to convert a foreign state dict to the module's keys (None: files already use them)."""

    build: Callable[[C], nn.Module]
    imagenet: Callable[[C], StateDict] | None = None
    convert: Callable[[StateDict, nn.Module], StateDict] | None = None


BACKBONES: Registry[BackboneSpec] = Registry("backbone", "backbone.name", group="backbone")


def register_backbone(
    name: str,
    config: type,
    *,
    imagenet: Callable[[Any], StateDict] | None = None,
    convert: Callable[[StateDict, nn.Module], StateDict] | None = None,
) -> Callable[[Callable[[Any], nn.Module]], Callable[[Any], nn.Module]]:
    """Decorator: register `build(cfg) -> nn.Module` as backbone `name` with options `config` (a dataclass
    deriving from `BackboneConfig`, whose `name` defaults to `name`)."""
    if not (isinstance(config, type) and issubclass(config, BackboneConfig)):
        raise TypeError(f"backbone {name!r}: config must be a dataclass deriving from BackboneConfig")

    def decorator(build: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        BACKBONES.register(name, config=config)(BackboneSpec(build, imagenet, convert))
        return build

    return decorator


def available_backbones() -> list[str]:
    return BACKBONES.names()


def backbone_config(name: str, options: Mapping[str, Any] | None = None) -> BackboneConfig:
    """The typed config of backbone `name` from `options` (defaults for the rest); unknown keys and values of
    the wrong type are a one-line ConfigError naming the option."""
    entry = BACKBONES.entry(name)
    config = entry.config
    assert config is not None
    options = dict(options or {})
    options.pop("name", None)
    fields = {f.name: f for f in dataclasses.fields(config)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        known = sorted(k for k in fields if k != "name")
        raise ConfigError(f"backbone.{unknown[0]} is not an option of backbone {name!r}; its options are {known}")
    hints = typing.get_type_hints(config)
    for key, value in options.items():
        _check_type(key, value, hints[key])
    return config(name=name, **options)


def build_backbone(name: str, **options: Any) -> nn.Module:
    """Build backbone `name` with keyword `options` (its config's fields) and load `options["pretrained"]`."""
    cfg = backbone_config(name, options)
    spec: BackboneSpec = BACKBONES.get(name)
    module = spec.build(cfg)
    for attr in ("out_channels", "stride"):
        if not isinstance(getattr(module, attr, None), int):
            raise TypeError(f"backbone {name!r} must define an int attribute {attr!r}")
    source = parse_pretrained(cfg.pretrained)
    if source.kind == "off":
        return module
    if source.kind == "imagenet":
        if spec.imagenet is None:
            raise CheckpointError(
                f"backbone.pretrained=imagenet: backbone {name!r} has no ImageNet weights; set "
                "backbone.pretrained=/path/to/weights.pth or backbone.pretrained=false"
            )
        state, origin = spec.imagenet(cfg), f"the ImageNet weights of backbone {name!r}"
    else:
        assert source.path is not None
        state, origin = read_state_dict(source.path), f"backbone.pretrained={source.path}"
    load_backbone_weights(module, state, origin, convert=spec.convert)
    return module


def _check_type(key: str, value: Any, hint: Any) -> None:
    """A light check of plain values against a field's annotation (int, float, str, bool, lists, optionals);
    Hydra checks the same at compose time, this covers Python callers and configs saved in checkpoints."""
    if _matches(value, hint):
        return
    raise ConfigError(f"backbone.{key}={value!r} is not valid; expected {_type_name(hint)}")


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        return isinstance(value, list | tuple) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str | bool | int | float | Path)  # OmegaConf turns these into strings too
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
