"""Models: backbones (by registry name) and the PRM network that puts a class-response head on them."""

from ranprm.models import backbones as _backbones  # noqa: F401  (registers every backbone)
from ranprm.models.registry import available_backbones, build_backbone, register_backbone

__all__ = ["available_backbones", "build_backbone", "register_backbone"]
