"""`python -m ranprm.bench gemm`: the machine's dense matrix-multiply rate, the reference for model efficiency.

One JSON line per dtype: `{"case": "gemm", "dtype": "bf16", "n": 4096, "tflops": ..., ...}`: the median rate of
`--repeats` square `n x n @ n x n` products (2 n^3 FLOPs each) after one warm-up. It is what this machine's
BLAS/oneDNN (CPU) or cuBLAS (GPU) reaches on an ideal shape, so efficiency against it says how much of the
reachable rate a model uses, which a nominal datasheet peak cannot.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ranprm.bench.common import machine, median_seconds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gemm_tflops(dtype: str, device: str = "cpu", n: int = 4096, repeats: int = 5) -> float:
    """Median TFLOP/s of an n x n matmul in `dtype` on `device`."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=DTYPES[dtype])
    seconds = median_seconds(lambda: torch.mm(a, b), device, repeats, warmup=1)
    return 2 * n**3 / seconds / 1e12


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m ranprm.bench gemm", description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {','.join(DTYPES)}")
    parser.add_argument("--n", type=int, default=None, help="matrix side (default: 4096 CPU, 8192 CUDA)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: n=256, 1 repeat")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes={args.dtypes!r}: choose from {','.join(DTYPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here; use --device cpu")
    n = 256 if args.quick else args.n or (8192 if args.device == "cuda" else 4096)
    repeats = 1 if args.quick else args.repeats
    if n < 1 or repeats < 1:
        parser.error("--n and --repeats must be >= 1")
    for dtype in dtypes:
        row = {"case": "gemm", "dtype": dtype, "n": n, "device": args.device, "machine": machine(args.device)}
        row |= {"tflops": round(gemm_tflops(dtype, args.device, n, repeats), 4), "repeats": repeats}
        row |= {"threads": torch.get_num_threads(), "torch": torch.__version__}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
