"""Small file helpers: every file ranprm writes is written atomically (temp file, then rename); torch files are
read without unpickling code."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ranprm.errors import CheckpointError


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so a reader sees the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def load_torch_file(path: str | Path, option: str) -> Any:
    """What `torch.save` wrote to `path`, read with `weights_only=True` so that a crafted file cannot run code.

    `option` names the setting the path came from (e.g. `ckpt=...`), for the one-line error a bad file gives.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{option}={str(path)!r}: no such file; give the path of a weight or checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused, truncated zip, not a torch file, ...
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"{option}={path}: cannot be read safely as a torch file ({reason})") from err
