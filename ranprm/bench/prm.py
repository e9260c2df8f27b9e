"""`python -m ranprm.bench prm`: batched vs looped peak backpropagation, per backbone, mode and peak count.

One JSON line per (backbone, mode, peaks):

    {"case": "prm", "backbone": "resnet50", "mode": "probability", "peaks": 16, "size": 448, "device": "cpu",
     "loop_s": ..., "batched_s": ..., "speedup": ..., "max_abs_diff": ..., ...}

What is measured, on one image of `--size` pixels and a CRM model built from the registry (backbone + 1x1
class conv, random weights: the cost does not depend on them):
- `loop_s`: `peak_response_maps_looped`, PRM's official procedure (one forward, one `.backward()` per peak,
  weights requiring grad);
- `batched_s`: `peak_response_maps` (one forward, vmap-ed backward w.r.t. the image only), with `--chunk-size`
  (default: `default_chunk_size(device, size**2)`);
- both include their forward; each is the median of `--repeats` runs after one untimed warm-up of each path;
- `max_abs_diff`: the largest difference between the two paths' PRMs (values in [0, 1]);
- `forward_s`: one plain forward of the same image (eval, no autograd), and `per_peak_vs_forward`: `batched_s /
  peaks` over it, the cost of a PRM in forwards (the target is <= 1.5 on every family, BENCHMARKS.md);
- `--precision bf16` runs the batched path in bf16 (`peak_response_maps(dtype=torch.bfloat16)`, as the panels do
  when training in bf16); the looped reference stays fp32, so `max_abs_diff` then shows bf16's error.
Peaks are distinct random (class, y, x) cells of the CRM, the same for both paths. A backbone is a registry name
with optional options, `name/key=value/...` (values read as YAML), e.g. `timm/model=convnext_tiny` or
`efficientnet_lite0/attention=[8,16]`; one that is not registered is skipped with a warning line on stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from ranprm.bench.common import int_list, median_seconds
from ranprm.bench.common import machine as bench_machine

MODES = ("probability", "gradient")
_QUICK_DEFAULTS = {"backbones": "tiny", "peaks": "1,4", "size": 64, "repeats": 1}
_FULL_DEFAULTS = {"backbones": "resnet50,ran,efficientnet_lite0", "peaks": "1,4,16,64", "size": 448, "repeats": 3}


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ranprm.bench prm",
        description="Batched vs looped peak backpropagation (PRM), one JSON line a case.",
    )
    parser.add_argument(
        "--backbones", default=None, help="comma-separated registry names with options: resnet50,timm/model=resnet18"
    )
    parser.add_argument("--peaks", default=None, help="comma-separated peak counts (default 1,4,16,64)")
    parser.add_argument("--size", type=int, default=None, help="square image side (default 448)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: probability,gradient")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per path; median kept (3)")
    parser.add_argument("--chunk-size", type=int, default=None, help="peaks per vectorised backward")
    parser.add_argument("--classes", type=int, default=20, help="CRM channels (VOC: 20)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and input, both paths")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="the batched path's dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny backbone, 64 px, 1 and 4 peaks")
    args = parser.parse_args(argv)

    defaults = _QUICK_DEFAULTS if args.quick else _FULL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.peaks = int_list(args.peaks, "--peaks", parser)
    # Commas separate backbones, except inside a list value: efficientnet_lite0/attention=[8,16],ran
    args.backbones = [b.strip() for b in re.split(r",(?![^\[]*\])", str(args.backbones)) if b.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.backbones:
        parser.error("give at least one backbone")
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes={','.join(args.modes)!r}: choose from {','.join(MODES)}")
    if args.size < 32 or args.repeats < 1 or args.classes < 1:
        parser.error("--size must be >= 32, --repeats and --classes >= 1")
    if args.chunk_size is not None and args.chunk_size < 1:
        parser.error("--chunk-size must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here; use --device cpu")
    return args


def _random_peaks(k: int, grid: tuple[int, int, int], generator: torch.Generator) -> Tensor:
    """(k, 4) `[0, class, y, x]`: distinct cells of a (C, h, w) grid while there are enough of them."""
    c, h, w = grid
    cells = c * h * w
    flat = (
        torch.randperm(cells, generator=generator)[:k]
        if k <= cells
        else torch.randint(cells, (k,), generator=generator)
    )
    cls, rest = flat // (h * w), flat % (h * w)
    return torch.stack([torch.zeros_like(flat), cls, rest // w, rest % w], dim=1)


def parse_backbone_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`name/key=value/...` -> (name, options); values are read as YAML (`[8,16]`, `16`, `resnet18`)."""
    name, *pairs = spec.split("/")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"backbone spec {spec!r}: {pair!r} is not key=value")
        options[key] = yaml.safe_load(value)
    return name, options


def _timed(fn: Callable[[], Tensor], repeats: int, device: torch.device) -> tuple[float, Tensor]:
    """Median seconds of `repeats` calls (after the caller's warm-up) and the last result."""
    results: list[Tensor] = []
    seconds = median_seconds(lambda: results.append(fn()), device, repeats, warmup=0)
    return seconds, results[-1]


def run_backbone(backbone: str, args: argparse.Namespace, machine: str) -> list[dict[str, Any]]:
    """All (mode, peaks) cases of one backbone; prints and returns their rows."""
    from ranprm.models.registry import build_backbone
    from ranprm.prm.backprop import default_chunk_size, peak_response_maps, peak_response_maps_looped

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    name, options = parse_backbone_spec(backbone)
    trunk = build_backbone(name, **options)
    model = nn.Sequential(trunk, nn.Conv2d(trunk.out_channels, args.classes, 1)).to(device)
    images = torch.randn(1, 3, args.size, args.size, device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    with torch.no_grad():
        crm_shape = tuple(model.eval()(images).shape[1:])

    def forward() -> Tensor:
        with torch.no_grad():
            return model(images)

    forward()
    forward_s, _ = _timed(forward, max(3, args.repeats), device)
    chunk = args.chunk_size if args.chunk_size is not None else default_chunk_size(device, args.size**2)
    generator = torch.Generator().manual_seed(args.seed)

    rows = []
    for mode in args.modes:
        warm = _random_peaks(1, crm_shape, generator).to(device)  # first calls pay one-off set-up costs
        peak_response_maps(model, images, warm, mode=mode, chunk_size=chunk, dtype=dtype)
        peak_response_maps_looped(model, images, warm, mode=mode)
        for k in args.peaks:
            peaks = _random_peaks(k, crm_shape, generator).to(device)
            loop_s, looped = _timed(
                lambda p=peaks, m=mode: peak_response_maps_looped(model, images, p, mode=m),
                args.repeats,
                device,
            )
            batched_s, batched = _timed(
                lambda p=peaks, m=mode: peak_response_maps(model, images, p, mode=m, chunk_size=chunk, dtype=dtype),
                args.repeats,
                device,
            )
            row = {
                "case": "prm",
                "backbone": backbone,
                "mode": mode,
                "peaks": k,
                "size": args.size,
                "device": args.device,
                "machine": machine,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "chunk_size": chunk,
                "channels_last": args.channels_last,
                "repeats": args.repeats,
                "loop_s": round(loop_s, 4),
                "batched_s": round(batched_s, 4),
                "speedup": round(loop_s / batched_s, 2),
                "max_abs_diff": float((looped - batched).abs().max()),
                "precision": args.precision,
                "forward_s": round(forward_s, 4),
                "per_peak_vs_forward": round(batched_s / k / forward_s, 2),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str]) -> None:
    args = _parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import ranprm.models.backbones  # noqa: F401  (fills the registry)
    from ranprm.models.registry import available_backbones

    machine = bench_machine(args.device)
    for backbone in args.backbones:
        if parse_backbone_spec(backbone)[0] not in available_backbones():
            print(
                f"warning: backbone {backbone!r} is not registered; skipped (registered: "
                f"{', '.join(available_backbones())})",
                file=sys.stderr,
                flush=True,
            )
            continue
        run_backbone(backbone, args, machine)


if __name__ == "__main__":
    main(sys.argv[1:])
