"""Loading backbone weights from files, safely (`weights_only=True` or safetensors: a crafted file cannot run
code), and fitting a state dict to a backbone with errors that say what does not fit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ranprm.errors import CheckpointError
from ranprm.utils.io import load_torch_file

# Keys that belong to a classifier on top of a backbone (torchvision's `fc`, timm's `classifier`, a PRM class conv)
# and that a backbone must not try to load.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")
# Where a backbone's keys sit inside a ranprm (Lightning) checkpoint or a PRMNet state dict.
_WRAPPER_PREFIXES = ("model.backbone.", "backbone.")

StateDict = dict[str, torch.Tensor]


def read_state_dict(path: str | Path) -> StateDict:
    """Read a state dict from a plain weight file, a Lightning checkpoint or a `.safetensors` file, without
    unpickling code."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise CheckpointError(
                f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)"
            ) from err
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise CheckpointError(f"backbone.pretrained={path}: not a readable safetensors file ({err})") from err
    obj = load_torch_file(path, "backbone.pretrained")
    for key in ("state_dict", "model", "model_state_dict"):  # Lightning, timm's training and common scripts
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"backbone.pretrained={path}: holds no state dict of tensors")
    return obj


def _added_keys(backbone: nn.Module) -> set[str]:
    """State keys of the layers the backbone adds on top of its trunk (attention branches): a trunk's weight file
    does not have them, and they keep their initialisation."""
    added = getattr(backbone, "added_modules", None)
    if added is None:
        return set()
    ids = {id(m) for m in added()}
    keys: set[str] = set()
    for name, module in backbone.named_modules():
        if id(module) in ids:
            keys |= {f"{name}.{k}" for k in module.state_dict()}
    return keys


def load_backbone_weights(
    backbone: nn.Module,
    state: StateDict,
    source: str,
    convert: Callable[[StateDict, nn.Module], StateDict] | None = None,
) -> None:
    """Load `state` into `backbone`: a bare backbone, a classifier's state dict, or a ranprm checkpoint.

    Steps: keep the backbone's part of a ranprm checkpoint, convert a foreign key format (`convert`, given by the
    backbone's registry entry), drop a classifier, then every remaining key must fit. Keys of the layers the
    backbone adds on top of its trunk (attention) may be missing: they keep their initialisation.
    """
    for prefix in _WRAPPER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            break
    if convert is not None:
        state = convert(state, backbone)
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state) - _added_keys(backbone))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: does not fit this backbone ({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); is it for another backbone?"
        )
    wrong = [k for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(
            f"{source}: shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, the backbone expects "
            f"{tuple(own[wrong[0]].shape)}; is it for another width or depth?"
        )
    backbone.load_state_dict(state, strict=False)
