"""Importing this package registers every backbone. Add one module per backbone here."""

from ranprm.models.backbones import ran, resnet, tiny  # noqa: F401
