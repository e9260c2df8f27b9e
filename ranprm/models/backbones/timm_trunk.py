"""`backbone=timm backbone.model=<timm name>`: the stride-32 feature map of any convolutional timm model.

The trunk is the model's `forward_features` (for CNNs: everything before the global pool, the last 1x1 "head"
convolution of EfficientNets included, so an ImageNet classifier turned into a 1x1 convolution over it gives
class maps). `output_stride=16` (or 8) asks timm to dilate the last stage(s) where the model supports it (ResNets,
EfficientNets, ...; others are refused with a one-line error). `attention=[4, 8, 16]` (any subset) puts RAN's mask
branch on the output of the first stage at each stride (timm's `feature_info`; `ranprm.models.attention`).

**Input.** ranprm feeds ImageNet-normalised images (mean 0.485/0.456/0.406, std 0.229/0.224/0.225); a model
whose weights were trained with another normalisation (timm's `pretrained_cfg`, e.g. 0.5/0.5 for the `tf_` ports)
gets a fixed per-channel affine map to its own before its first layer, so it sees the inputs its weights expect.

**Weights.** `pretrained=imagenet` loads the model's default pretrained weights through timm (the Hugging Face hub
when online, its cache otherwise); offline with an empty cache, the error is one line saying what to do.
`pretrained=/path` reads a timm state dict (`.pth`, `.bin` or `.safetensors`, classifier dropped) or a ranprm
checkpoint of this backbone. Needs the `timm` package: `pip install 'ranprm[weights]'`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ranprm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ranprm.errors import CheckpointError, ConfigError
from ranprm.models.attention import AttentionHost, TrunkConfig
from ranprm.models.registry import StateDict, register_backbone

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]  # (mean, std) per RGB channel


def import_timm(option: str = "backbone=timm") -> Any:
    try:
        import timm
    except ImportError as err:
        raise ConfigError(f"{option} needs the timm package; install it with pip install 'ranprm[weights]'") from err
    return timm


@dataclass
class TimmConfig(TrunkConfig):
    """Any convolutional timm model by `model` name; the trunk options of `TrunkConfig` (`output_stride` 16 or 8
    where the model supports dilation); `kwargs`: extra arguments for `timm.create_model` (e.g. drop_path_rate)."""

    name: str = "timm"
    model: str = "resnet50"
    kwargs: dict[str, Any] = field(default_factory=dict)


class InputConversion(nn.Module):
    """A fixed per-channel affine map from ImageNet normalisation to `(mean, std)`: x * scale + shift."""

    def __init__(self, stats: Stats) -> None:
        super().__init__()
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in stats)
        in_mean, in_std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        # Not saved in state dicts: it follows from the model's definition, not from training.
        self.register_buffer("scale", in_std / std, persistent=False)
        self.register_buffer("shift", (in_mean - mean) / std, persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return images * self.scale + self.shift


def _is_imagenet(stats: Stats) -> bool:
    return all(abs(a - b) < 1e-6 for a, b in zip((*stats[0], *stats[1]), (*IMAGENET_MEAN, *IMAGENET_STD), strict=True))


class TimmTrunk(AttentionHost, nn.Module):
    """`timm.create_model(model, num_classes=0, global_pool="")`'s `forward_features`: (B, 3, H, W) ->
    (B, num_features, ~H/stride, ~W/stride)."""

    def __init__(
        self,
        model: str,
        output_stride: int = 32,
        attention: Sequence[int] = (),
        attention_init: str = "identity",
        mask_grad: str = "full",
        input_stats: Stats | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        timm = import_timm()
        self.model_name = model
        extra = dict(kwargs)
        if output_stride != 32:
            extra["output_stride"] = output_stride
        try:
            self.body = timm.create_model(model, pretrained=False, num_classes=0, global_pool="", **extra)
        except (RuntimeError, TypeError, ValueError, AssertionError) as err:
            known = timm.list_models(model) or timm.list_models(f"*{model}*")[:5]
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            hint = f"timm has {known}" if known else "see timm.list_models()"
            raise ConfigError(
                f"backbone.model={model!r} with {extra or 'no options'} cannot be built by timm ({reason}); {hint}"
            ) from err
        info = list(getattr(self.body, "feature_info", None) or [])
        if not info:
            raise ConfigError(f"backbone.model={model!r}: timm gives no feature_info for it; choose a CNN")
        self.stride = int(info[-1]["reduction"])
        if output_stride != 32 and self.stride != output_stride:  # 32: the model's own final stride
            raise ConfigError(
                f"backbone.output_stride={output_stride}: timm's {model} gives stride {self.stride}; use a model "
                "that supports dilation (ResNets, EfficientNets) or output_stride=32"
            )
        self.out_channels = int(self.body.num_features)
        if input_stats is None:
            pretrained_cfg = getattr(self.body, "pretrained_cfg", None) or {}
            input_stats = (
                tuple(pretrained_cfg.get("mean", IMAGENET_MEAN)),
                tuple(pretrained_cfg.get("std", IMAGENET_STD)),
            )  # type: ignore[assignment]
        assert input_stats is not None
        self.input_conversion = None if _is_imagenet(input_stats) else InputConversion(input_stats)
        stages = []
        for stride in sorted(set(attention)):
            found = [f for f in info if f["reduction"] == stride]
            if not found:
                raise ConfigError(
                    f"backbone.attention: timm's {model} has no stage at stride {stride} "
                    f"(its stages: {[f['reduction'] for f in info]})"
                )
            stages.append(
                (found[0]["module"], self.body.get_submodule(found[0]["module"]), int(found[0]["num_chs"]), stride)
            )
        self.attach_attention(stages, attention_init, mask_grad)  # type: ignore[arg-type]

    def forward(self, images: Tensor) -> Tensor:
        x = images if self.input_conversion is None else self.input_conversion(images)
        features = self.body.forward_features(x)
        if not isinstance(features, Tensor) or features.ndim != 4:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ConfigError(
                f"backbone.model={self.model_name!r}: its forward_features gives {shape}, not a (B, C, h, w) map; "
                "choose a convolutional model"
            )
        return features


def timm_state_convert(state: StateDict, trunk: nn.Module) -> StateDict:
    """A timm model's own state dict -> this trunk's keys (`body.` prefix, the classifier dropped); a state dict
    already in the trunk's keys is returned as it is."""
    if any(k.startswith("body.") for k in state):
        return state
    body = trunk.body  # type: ignore[union-attr]
    head = (getattr(body, "pretrained_cfg", None) or {}).get("classifier") or "classifier"
    heads = tuple(head) if isinstance(head, list | tuple) else (head,)
    return {f"body.{k}": v for k, v in state.items() if not any(k == h or k.startswith(f"{h}.") for h in heads)}


def _timm_imagenet(cfg: TimmConfig) -> StateDict:
    timm = import_timm()
    try:
        model = timm.create_model(cfg.model, pretrained=True, num_classes=0, global_pool="", **cfg.kwargs)
    except Exception as err:  # offline (hub connection / cache miss), or a model without pretrained weights
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise CheckpointError(
            f"backbone.pretrained=imagenet: timm cannot load ImageNet weights for {cfg.model!r} ({reason}); "
            "offline, load them once online (timm caches them under ~/.cache/huggingface), or set "
            "backbone.pretrained=/path/to/weights.safetensors or backbone.pretrained=false"
        ) from err
    return model.state_dict()


@register_backbone("timm", TimmConfig, imagenet=_timm_imagenet, convert=timm_state_convert)
def build_timm(cfg: TimmConfig) -> TimmTrunk:
    return TimmTrunk(cfg.model, cfg.output_stride, cfg.attention, cfg.attention_init, cfg.mask_grad, **cfg.kwargs)
