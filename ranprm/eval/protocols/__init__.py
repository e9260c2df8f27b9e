"""Instance-segmentation protocols (`eval.protocol`): how predicted masks are scored, matched and turned into AP.

One file per protocol, registered in `PROTOCOLS` (see `base.py`): `voc` (chainercv's, what the published image-level
tables use) and `coco` (COCO-style AP through faster-coco-eval).
"""

from ranprm.eval.protocols.base import PROTOCOLS, Protocol
from ranprm.utils.registry import import_submodules

import_submodules(__name__)

__all__ = ["PROTOCOLS", "Protocol"]
