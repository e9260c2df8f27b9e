"""`python -m ranprm.bench train`: training-step throughput, peak memory, and efficiency against the GEMM rate.

One JSON line per (backbone, size, precision):

    {"case": "train", "backbone": "ran", "size": 448, "batch": 8, "precision": "bf16", "channels_last": true,
     "compile": false, "step_s": ..., "images_per_s": ..., "peak_mem_mb": ..., "gflop_per_step": ...,
     "achieved_tflops": ..., "gemm_tflops": ..., "efficiency": ..., ...}

A step is what `ranprm.train` runs per batch, from the same pieces: the module `ranprm.train` builds, its
forward (with its memory format), its peak-stimulation head (`class_logits`), its loss, the backward, and its
optimizer's step (`PRMModule.build_optimizer`). Settings come from the shipped `conf/train.yaml` (Adam); images and
labels are random.
- `step_s`: median of `--repeats` steps after `--warmup` (which also absorbs `torch.compile`'s compilation);
  `first_step_s`: the first step alone (with `--compile`, the compilation's one-off cost).
- `gflop_per_step`: counted by `torch.utils.flop_counter.FlopCounterMode` over one forward and backward
  (convolutions and matmuls, 2 FLOPs per multiply-add); the optimizer's elementwise work is not counted.
- `gemm_tflops`: this machine's dense matmul rate in the step's compute dtype (`ranprm.bench.gemm`).
- `efficiency` = gflop_per_step / step_s / gemm rate: the share of the reachable matmul rate the step uses
  (MFU against a measured, not a datasheet, peak).
- `peak_mem_mb`: peak memory above the built model and batch (see `ranprm.bench.common.PeakMemory`); each case
  runs in its own subprocess unless `--in-process`.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ranprm.bench.common import PeakMemory, check_device_and_backbones, int_list, median_seconds, run_isolated
from ranprm.bench.common import machine as bench_machine
from ranprm.bench.gemm import gemm_tflops

PRECISIONS = ("fp32", "bf16")
_QUICK_DEFAULTS = {"backbones": "tiny", "sizes": "64", "batch": 2, "repeats": 1, "warmup": 1, "precisions": "fp32"}
_FULL_DEFAULTS = {
    "backbones": "ran,ran92,resnet50",
    "sizes": "448,128",
    "batch": 8,
    "repeats": 3,
    "warmup": 1,
    "precisions": "fp32,bf16",
}


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ranprm.bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=None, help="comma-separated registry names (ran,ran92,resnet50)")
    parser.add_argument("--sizes", default=None, help="comma-separated square sides (default 448,128)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 8)")
    parser.add_argument("--precisions", default=None, help="comma-separated: fp32,bf16 (bf16: autocast)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps; the median is kept (3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="NCHW instead")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (as `compile=true`)")
    parser.add_argument("--classes", type=int, default=20, help="CRM channels (VOC: 20)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--gemm-n", type=int, default=None, help="GEMM reference side (default 4096 CPU, 8192 GPU)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny backbone, 64 px, batch 2, fp32")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per case (CPU memory may under-count)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (_QUICK_DEFAULTS if args.quick else _FULL_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sizes = int_list(args.sizes, "--sizes", parser, minimum=32)
    args.backbones = [b.strip() for b in str(args.backbones).split(",") if b.strip()]
    args.precisions = [p.strip() for p in str(args.precisions).split(",") if p.strip()]
    if not args.backbones:
        parser.error("give at least one backbone")
    if not args.precisions or any(p not in PRECISIONS for p in args.precisions):
        parser.error(f"--precisions={','.join(args.precisions)!r}: choose from {','.join(PRECISIONS)}")
    if min(args.batch, args.repeats, args.classes) < 1 or args.warmup < 0:
        parser.error("--batch, --repeats and --classes must be >= 1 and --warmup >= 0")
    check_device_and_backbones(parser, args.device, args.backbones)
    return args


def build_step(
    backbone: str,
    args: argparse.Namespace,
    size: int,
    precision: str,
    compile: bool,  # noqa: A002
) -> tuple[Any, Any]:
    """(step, forward_backward): one optimizer step, and the forward+backward alone (for the FLOP count)."""
    from ranprm.cli.build import build_module
    from ranprm.cli.config import compose

    cfg = compose("train", [f"backbone={backbone}", f"channels_last={args.channels_last}", f"compile={compile}"])
    device = torch.device(args.device)
    torch.manual_seed(0)
    module = build_module(cfg, tuple(f"class{i}" for i in range(args.classes))).to(device)
    module.train()
    optimizer = module.build_optimizer()
    images = torch.randn(args.batch, 3, size, size, device=device)
    labels = (torch.rand(args.batch, args.classes, device=device) < 0.2).float()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def forward_backward() -> None:
        with autocast:
            loss = module.loss_fn(module.class_logits(module(images)), labels)
        loss.backward()

    def step() -> None:
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, forward_backward


def measure(backbone: str, size: int, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    step, _ = build_step(backbone, args, size, precision, compile=args.compile)
    memory = PeakMemory(args.device)
    # The first step alone: with --compile it includes the compilation, the price paid once per run.
    first = median_seconds(step, args.device, repeats=1, warmup=0)
    seconds = median_seconds(step, args.device, args.repeats, max(0, args.warmup - 1))
    peak_mb = memory.peak_mb()
    del step
    # FLOPs are counted on an eager copy, built after the memory was read: the model's FLOPs whatever compile fuses.
    _, eager_forward_backward = build_step(backbone, args, size, precision, compile=False)
    counter = FlopCounterMode(display=False)
    with counter:
        eager_forward_backward()
    flops = counter.get_total_flops()
    return {
        "step_s": _sig(seconds),
        "first_step_s": _sig(first),
        "gflop_per_step": _sig(flops / 1e9),
        "peak_mem_mb": peak_mb,
    }


def _sig(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant figures (rates span 1e-4 on a smoke run to 1e3 on a GPU)."""
    return float(f"{value:.{digits}g}")


def _child_argv(args: argparse.Namespace, backbone: str, size: int, precision: str) -> list[str]:
    argv = ["--child", "--backbones", backbone, "--sizes", str(size), "--precisions", precision]
    argv += ["--batch", str(args.batch), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    argv += ["--classes", str(args.classes), "--device", args.device]
    argv += [] if args.channels_last else ["--no-channels-last"]
    return argv + (["--compile"] if args.compile else [])


def main(argv: list[str]) -> None:
    args = _parse_args(argv)
    if args.child:
        result = measure(args.backbones[0], args.sizes[0], args.precisions[0], args)
        print(json.dumps(result), flush=True)
        return
    gemm_n = 256 if args.quick else args.gemm_n or (8192 if args.device == "cuda" else 4096)
    gemm = {p: gemm_tflops(p, args.device, gemm_n, repeats=1 if args.quick else 5) for p in args.precisions}
    machine = bench_machine(args.device)
    for backbone in args.backbones:
        for size in args.sizes:
            for precision in args.precisions:
                if args.in_process:
                    result = measure(backbone, size, precision, args)
                else:
                    result = run_isolated("ranprm.bench.train", _child_argv(args, backbone, size, precision))
                row: dict[str, Any] = {"case": "train", "backbone": backbone, "size": size, "batch": args.batch}
                row |= {"precision": precision, "channels_last": args.channels_last, "compile": args.compile}
                row |= {"device": args.device, "machine": machine, "torch": torch.__version__}
                row |= {"repeats": args.repeats, "warmup": args.warmup, "threads": torch.get_num_threads()}
                row |= result
                if "step_s" in result:
                    achieved = result["gflop_per_step"] / result["step_s"] / 1e3
                    row |= {"images_per_s": round(args.batch / result["step_s"], 3)}
                    row |= {"achieved_tflops": _sig(achieved), "gemm_tflops": _sig(gemm[precision])}
                    row |= {"efficiency": _sig(achieved / gemm[precision])}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
