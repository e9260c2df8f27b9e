"""Loading backbone weights from files, safely (`weights_only=True`: a crafted file cannot run code)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ranprm.errors import CheckpointError
from ranprm.utils.io import load_torch_file

# Keys that belong to a classifier on top of a backbone (torchvision's `fc`, a PRM class conv) and that a backbone
# must not try to load.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a plain weight file or from a Lightning checkpoint, without unpickling code."""
    obj = load_torch_file(path, "backbone.pretrained")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return obj


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `backbone`, accepting a bare backbone, a full classifier, or a ranprm checkpoint."""
    for prefix in ("model.backbone.", "backbone."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            break
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
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
    backbone.load_state_dict(state)
