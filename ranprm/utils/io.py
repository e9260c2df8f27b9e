"""Small file helpers: every file ranprm writes is written atomically (temp file, then rename) with the mode the
umask asks for; temp files a killed process left behind are removed by the next run; torch files are read without
unpickling code; an output folder is checked writable before any expensive work starts."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ranprm.errors import CheckpointError, ConfigError, RunFolderError

# Every temp file ranprm writes ends with this suffix and names its host and process, so that a later run can tell
# its own stale leftovers (a SIGKILL during a write) from a file another live process is writing right now.
TEMP_SUFFIX = ".ranprm-tmp"
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]*)\.(?P<pid>\d+)\.[0-9a-f]+" + re.escape(TEMP_SUFFIX) + "$")
# The checkpoint writer of ranprm <= 0.1 named its temp files `.<name>.<pid>.tmp` (issue 18: a 55 MB leftover).
_LEGACY_CKPT_TEMP = re.compile(r"^\..+\.ckpt\.(?P<pid>\d+)\.tmp$")
STALE_AFTER_S = 24 * 3600  # a temp file from another host counts as stale only after a day

_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40]


def temp_path_for(path: Path) -> Path:
    """A fresh temp file name next to `path` (same folder, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def file_mode() -> int:
    """The mode a plain `open()` would give a new file: 0o666 without the umask's bits (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def is_stale_temp_file(path: Path, now: float | None = None) -> bool:
    """True for a ranprm temp file whose writer is gone: same host and a dead pid, or older than a day."""
    match = _TEMP_NAME.match(path.name) or _LEGACY_CKPT_TEMP.match(path.name)
    if match is None or not path.is_file():
        return False
    same_host = match.groupdict().get("host", _host()) == _host()
    if same_host and int(match["pid"]) != os.getpid() and not _pid_alive(int(match["pid"])):
        return True
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return not same_host and age > STALE_AFTER_S


def clean_stale_temp_files(*folders: Path) -> list[Path]:
    """Remove the stale temp files (see `is_stale_temp_file`) directly inside `folders`; returns what was removed."""
    removed = []
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for path in Path(folder).iterdir():
            if is_stale_temp_file(path):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def write_via_temp(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temp)` to fill a temp file next to `path`, fsync it, give it the umask's mode and rename it onto
    `path`: a reader sees the old file or the whole new one, never half of it, and a failure leaves no temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:  # the data must be on disk before the rename makes it the file
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so a reader sees the old file or the whole new one, never half of it."""
    return write_via_temp(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(path: str | Path, obj: Any, compact: bool = False) -> Path:
    """`obj` as JSON, keys sorted; indented for people, or `compact` (no spaces, one line) for machine records."""
    layout: dict[str, Any] = {"separators": (",", ":")} if compact else {"indent": 2}
    text = json.dumps(obj, sort_keys=True, **layout)
    return write_bytes_atomic(path, (text + "\n").encode())


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def is_disk_error(err: BaseException) -> bool:
    """An OSError a user fixes on the file system (full disk, quota, read-only, permissions)."""
    return isinstance(err, OSError) and err.errno in _DISK_ERRNOS


@contextlib.contextmanager
def disk_errors_in_one_line(path: str | Path, then: str) -> Iterator[None]:
    """Within, a full disk, a quota, a read-only mount or a permission refused while writing `path` is one line
    (`RunFolderError`) naming the file and the cause, ending with `then` (what the user does next)."""
    try:
        yield
    except OSError as err:
        if not is_disk_error(err):
            raise
        raise RunFolderError(f"cannot write {path} ({err.strerror or err}); free space or fix the folder's "
                             f"permissions, then {then}") from err  # fmt: skip


def check_writable(folder: str | Path, option: str, min_free_bytes: int = 0) -> Path:
    """Create `folder` if needed and prove a file can be written there, before any expensive work starts.

    `option` names the setting the folder came from (e.g. `output=...`), for the one-line error. `min_free_bytes`:
    refuse a disk with less free space than the run will write (e.g. two checkpoints).
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option}={str(folder)!r} is a file; give a folder")
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".ranprm-write-probe.{_host()}.{os.getpid()}"  # DDP ranks probe the same folder at once
        write_bytes_atomic(probe, b"ranprm\n")
        probe.unlink()
        free = shutil.disk_usage(folder).free
    except OSError as err:
        raise ConfigError(
            f"{option}={str(folder)!r} is not writable ({err.strerror or err}); choose another folder or free it"
        ) from err
    finally:
        for path in created:  # the outputs create it again; a failed run must not leave empty folders behind
            with contextlib.suppress(OSError):
                path.rmdir()
    if free < min_free_bytes:
        raise ConfigError(
            f"{option}={str(folder)!r}: only {free / 2**20:.0f} MiB free on its disk, and this run writes about "
            f"{min_free_bytes / 2**20:.0f} MiB; free some space or choose another folder"
        )
    return folder


def load_torch_file(path: str | Path, option: str, mmap: bool = False) -> Any:
    """What `torch.save` wrote to `path`, read with `weights_only=True` so that a crafted file cannot run code.

    `option` names the setting the path came from (e.g. `ckpt=...`), for the one-line error a bad file gives.
    `mmap=True` maps the tensors instead of reading them: a cheap check of a large file's structure.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{option}={str(path)!r}: no such file; give the path of a weight or checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # unpickling refused, truncated zip, not a torch file, ...
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"{option}={path}: cannot be read safely as a torch file ({reason})") from err
