"""Importing this package registers every backbone. Add one module per backbone here."""

from ranprm.models.backbones import resnet, tiny  # noqa: F401
