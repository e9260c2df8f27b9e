"""Wall-clock timing of pipeline stages that counts queued GPU work (for the benches and latency reports)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers it (nothing to do on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stage(times: dict[str, float] | None, name: str, device: torch.device | str) -> Iterator[None]:
    """Add the block's seconds to `times[name]`; with `times=None` it does nothing, not even a sync."""
    if times is None:
        yield
        return
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    times[name] = times.get(name, 0.0) + time.perf_counter() - start
