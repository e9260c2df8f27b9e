"""`python -m ranprm.bench backbones`: forward and forward+backward time and peak memory per backbone.

One JSON line per (backbone, size):

    {"case": "backbones", "backbone": "ran", "size": 448, "batch": 8, "device": "cpu", "fwd_s": ...,
     "fwdbwd_s": ..., "fwd_peak_mem_mb": ..., "peak_mem_mb": ..., "mem_measure": "...", ...}

What is measured:
- `fwd_s`: eval mode, autograd off: the inference cost of one batch. `fwdbwd_s`: train mode, forward plus
  the backward of the output's sum: a training step without the optimizer. Both are medians over `--repeats`
  runs after `--warmup` runs.
- `peak_mem_mb` (forward+backward) and `fwd_peak_mem_mb`: the peak memory above what the built model and the
  input batch already hold, over the warm-up and the timed runs, so weights are not counted but activations,
  gradients and workspaces are.
  - CUDA: `torch.cuda.max_memory_allocated()` minus the allocation before the first run (tensor memory; the
    caching allocator may reserve more).
  - CPU: the resident-set high-water mark (`VmHWM`, reset through `/proc/self/clear_refs`) minus the resident
    set before the first run. Where that reset is unavailable, `ru_maxrss` replaces it, an upper bound that
    can include the model's construction.
  `mem_measure` names the one used.

Each measurement (one backbone, size and mode) runs in a fresh subprocess by default: a CPU process keeps
freed memory for reuse, so a second measurement in the same process would under-count its peak.
`--in-process` skips that isolation (fast, for tests; its CPU memory figures can be too low).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from typing import Any

import torch

from ranprm.bench.common import PeakMemory, check_device_and_backbones, int_list, median_seconds, run_isolated
from ranprm.bench.common import machine as bench_machine
from ranprm.bench.prm import parse_backbone_spec

MODES = ("fwd", "fwdbwd")
_QUICK_DEFAULTS = {"sizes": "64", "batch": 2, "repeats": 1, "warmup": 1}
_FULL_DEFAULTS = {"sizes": "448,160", "batch": 8, "repeats": 3, "warmup": 1}


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ranprm.bench backbones",
        description="Forward and forward+backward time and peak memory of backbones, one JSON line a case.",
    )
    parser.add_argument(
        "--backbones",
        default="ran,ran92,resnet50",
        help="comma-separated registry names, with options as name/key=value (timm/model=resnet18)",
    )
    parser.add_argument("--sizes", default=None, help="comma-separated square image sides (default 448,160)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per mode; the median is kept (3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs before timing (default 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 px, batch 2, 1 repeat")
    parser.add_argument(
        "--in-process", action="store_true", help="no subprocess per measurement (CPU memory may under-count)"
    )
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # one measurement, in a subprocess
    args = parser.parse_args(argv)

    defaults = _QUICK_DEFAULTS if args.quick else _FULL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sizes = int_list(args.sizes, "--sizes", parser)
    args.backbones = [b.strip() for b in re.split(r",(?![^\[]*\])", args.backbones) if b.strip()]
    if not args.sizes or not args.backbones:
        parser.error("give at least one size and one backbone")
    if min(args.batch, args.repeats) < 1 or args.warmup < 0:
        parser.error("--batch and --repeats must be >= 1 and --warmup >= 0")
    check_device_and_backbones(parser, args.device, [parse_backbone_spec(b)[0] for b in args.backbones])
    return args


def measure(backbone: str, size: int, batch: int, mode: str, device: str, repeats: int, warmup: int) -> dict[str, Any]:
    """Median seconds per batch and peak memory (MiB above model + input) of one backbone in one mode."""
    import ranprm.models.backbones  # noqa: F401  (fills the registry)
    from ranprm.models.registry import build_backbone

    dev = torch.device(device)
    torch.manual_seed(0)
    name, options = parse_backbone_spec(backbone)
    model = build_backbone(name, **options).to(dev)
    images = torch.randn(batch, 3, size, size, device=dev)
    params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)

    def forward() -> None:
        with torch.no_grad():
            model(images)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)  # as a training loop does; the gradients' memory counts in the peak
        model(images).sum().backward()

    step: Callable[[], None]
    if mode == "fwd":
        model.eval()
        step = forward
    else:
        model.train()
        step = forward_backward

    memory = PeakMemory(dev)
    seconds = median_seconds(step, dev, repeats, warmup)
    return {
        "time_s": round(seconds, 4),
        "peak_mem_mb": memory.peak_mb(),
        "mem_measure": memory.kind,
        "params_m": params_m,
        "threads": torch.get_num_threads(),
    }


def _measure_in_subprocess(args: argparse.Namespace, backbone: str, size: int, mode: str) -> dict[str, Any]:
    cmd = ["--child", mode, "--backbones", backbone]
    cmd += ["--sizes", str(size), "--batch", str(args.batch), "--repeats", str(args.repeats)]
    cmd += ["--warmup", str(args.warmup), "--device", args.device]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    return run_isolated("ranprm.bench.backbones", cmd)


def main(argv: list[str]) -> None:
    args = _parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        result = measure(
            args.backbones[0], args.sizes[0], args.batch, args.child, args.device, args.repeats, args.warmup
        )
        print(json.dumps(result), flush=True)
        return

    machine = bench_machine(args.device)
    for backbone in args.backbones:
        for size in args.sizes:
            row: dict[str, Any] = {
                "case": "backbones",
                "backbone": backbone,
                "size": size,
                "batch": args.batch,
                "device": args.device,
                "machine": machine,
                "torch": torch.__version__,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "isolated": not args.in_process,
            }
            for mode in MODES:
                if args.in_process:
                    result = measure(backbone, size, args.batch, mode, args.device, args.repeats, args.warmup)
                else:
                    result = _measure_in_subprocess(args, backbone, size, mode)
                if "error" in result:
                    row[f"{mode}_error"] = result["error"]
                    continue
                row[f"{mode}_s"] = result["time_s"]
                row["peak_mem_mb" if mode == "fwdbwd" else "fwd_peak_mem_mb"] = result["peak_mem_mb"]
                row.update(params_m=result["params_m"], threads=result["threads"], mem_measure=result["mem_measure"])
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
