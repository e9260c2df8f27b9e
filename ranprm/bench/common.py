"""What every bench case shares: the machine's name, device syncs, median timing, peak memory, isolation."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ranprm.utils.timing import sync

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def machine(device: str) -> str:
    """The GPU's name, or the CPU model and logical core count."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores"


def median_seconds(step: Callable[[], Any], device: torch.device | str, repeats: int, warmup: int) -> float:
    """Median wall time of `step()` over `repeats` runs after `warmup` untimed ones, device work included."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu_rss_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{_STATUS} has no {field}")
    return int(match.group(1))


class PeakMemory:
    """Peak memory above the level at construction, in MiB, for one device.

    - CUDA: `torch.cuda.max_memory_allocated()` minus the allocation at construction (tensor memory; the caching
      allocator may reserve more).
    - CPU: the resident-set high-water mark (`VmHWM`, reset through `/proc/self/clear_refs`) minus the resident
      set at construction. Where that reset is unavailable, `ru_maxrss` replaces it, an upper bound that can
      include what was built before.
    `kind` names the one used. A CPU process keeps freed memory for reuse, so measure one thing per process
    (`run_isolated`) for a figure that is not too low.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            _CLEAR_REFS.write_text("5")  # resets this process's VmHWM to its current resident set
            self.kind = "rss_hwm"
            self.base = _cpu_rss_kb("VmRSS") * 1024
        except OSError:
            self.kind = "ru_maxrss"
            try:
                self.base = _cpu_rss_kb("VmRSS") * 1024
            except OSError:
                self.base = 0  # no /proc (macOS): the figure becomes the whole process's peak

    def peak_mb(self) -> float:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "rss_hwm":
            peak = _cpu_rss_kb("VmHWM") * 1024
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        return round(max(peak - self.base, 0) / 2**20, 1)


def run_isolated(module: str, argv: list[str]) -> dict[str, Any]:
    """Run `python -m module *argv` and return the JSON object on its last stdout line, or `{"error": ...}`."""
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def int_list(text: str, option: str, parser: argparse.ArgumentParser, minimum: int = 1) -> list[int]:
    """`"1,4,16"` -> `[1, 4, 16]`, or a usage error (exit 2) naming `option` for non-integers, an empty list
    or a value under `minimum`."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        parser.error(f"{option}={text!r}: give comma-separated integers, e.g. 1,4,16")
    if not values or min(values) < minimum:
        parser.error(f"{option}={text!r}: give at least one value, all >= {minimum}")
    return values


def check_device_and_backbones(parser: argparse.ArgumentParser, device: str, backbones: list[str]) -> None:
    """A usage error (exit 2) for `--device cuda` without CUDA or a backbone the registry does not know."""
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here; use --device cpu")
    import ranprm.models.backbones  # noqa: F401  (fills the registry)
    from ranprm.models.registry import available_backbones

    unknown = [b for b in backbones if b not in available_backbones()]
    if unknown:
        parser.error(f"--backbones: unknown {unknown}; choose from {available_backbones()}")
