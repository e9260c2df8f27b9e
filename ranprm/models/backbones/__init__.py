"""Every module of this package registers one backbone family: importing the package imports them all, so a new
backbone is one new file here (see `ranprm.models.registry`)."""

from ranprm.utils.registry import import_submodules

import_submodules(__name__)
