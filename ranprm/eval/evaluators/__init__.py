"""The evaluators ranprm ships, one file per metric family; importing this package registers them all."""

from ranprm.utils.registry import import_submodules

import_submodules(__name__)
