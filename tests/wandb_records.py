"""Read what an offline W&B run recorded (`<dir>/wandb/offline-run-*/run-<id>.wandb`), for tests.

The file is W&B's transaction log: a 7-byte header (`:W&B`, a magic number, a version), then LevelDB-log framed
protobuf `Record`s in 32 KiB blocks (each chunk: crc32, length, type FULL/FIRST/MIDDLE/LAST; a block tail too short
for a chunk header is padding). wandb itself no longer ships a Python reader, so the tests carry this small one.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    """Every `wandb_internal_pb2.Record` of an offline run file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, offset = [], b"", HEADER
    while offset + 7 <= len(data):
        if BLOCK - offset % BLOCK < 7:  # block tail padding
            offset += BLOCK - offset % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if offset + 7 + length > len(data):
            break  # a chunk still being written
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        else:
            break  # zero padding at the end of the file
        record = pb.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


def offline_runs(run_dir: Path) -> list[Path]:
    """The offline W&B run folders under `<run_dir>/wandb`, oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*"))


def finished_records(run_folder: Path, timeout_s: float = 30.0) -> list[Any]:
    """The records of a finished offline run folder. `wandb.finish()` can return before W&B's writer process has
    flushed the file, so this waits (up to `timeout_s`) for the run's closing `exit` record."""
    import time

    (file,) = Path(run_folder).glob("run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_records(file) if file.stat().st_size > HEADER else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def run_record(run_folder: Path) -> Any:
    """The `RunRecord` (id, group, job type, name, tags) of one offline run folder."""
    runs = records_of_type(run_folder, "run")
    assert runs, f"no run record in {run_folder}"
    return runs[0]


def records_of_type(run_folder: Path, kind: str) -> list[Any]:
    """The records of one kind ("artifact", "history", "exit", ...) of a finished offline run folder."""
    return [getattr(r, kind) for r in finished_records(run_folder) if r.WhichOneof("record_type") == kind]


def history(run_folder: Path) -> list[dict[str, Any]]:
    """The logged rows of an offline run folder: `{key: value}` with nested keys joined by "." (a table's
    `eval/per_class._type`) and values decoded from JSON."""
    import json

    rows = []
    for record in records_of_type(run_folder, "history"):
        rows.append({(item.key or ".".join(item.nested_key)): json.loads(item.value_json) for item in record.item})
    return rows
