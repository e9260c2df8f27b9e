"""`python -m ranprm.bench variants`: inference variants from one pass against one evaluation per variant.

One JSON line:

    {"case": "variants", "variants": 10, "images": 8, "one_pass_s": ..., "separate_s": ..., "speedup": ...,
     "single_after_s": ..., "single_before_s": ..., ...}

`ranprm-evaluate` of one checkpoint on the same images: `one_pass_s` with `variants=` (the product of
`--thresholds` and `--retrievals`: 5 presets x 2 methods = 10 by default), `separate_s` the sum of one evaluation
per variant (`threshold=<preset> retrieval=<method>`), `speedup` their ratio. Each evaluation is `evaluate()`
in this process after one untimed warm-up evaluation (imports, first-call costs), wall time end to end (data,
model loading, Trainer, metrics, files).

`single_after_s` / `single_before_s`: one variant (the first) alone, timed in a fresh process whose
`PYTHONPATH` is this tree / `--before` (another checkout of ranprm, e.g. the commit before variants existed),
each after its own warm-up; both evaluate at `data.image_size`, which the older tree needs.

The checkpoint is `--ckpt`, or a `--backbone` trained for `--steps` steps on the data of the trailing Hydra
overrides (default: the embedded synthetic data at 128 px), written to a temporary folder: an untrained model's
peak counts are whatever its random maps give.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ranprm.bench.common import machine

_SINGLE = """
import json, sys, time
from ranprm.cli.config import compose
from ranprm.evaluate import evaluate
overrides, out = json.loads(sys.argv[1]), sys.argv[2]
evaluate(compose("evaluate", [*overrides, f"output={out}/warm", "eval.max_images=1"]))
start = time.perf_counter()
evaluate(compose("evaluate", [*overrides, f"output={out}/timed"]))
print(json.dumps({"wall_s": time.perf_counter() - start}))
"""


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ranprm.bench variants", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="a trained checkpoint (default: train --backbone briefly)")
    parser.add_argument("--backbone", default="ran", help="registry name to train when no --ckpt is given")
    parser.add_argument("--steps", type=int, default=30, help="training steps of that model")
    parser.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override of that training only, e.g. backbone.width=16")  # fmt: skip
    parser.add_argument("--images", type=int, default=8, help="evaluated images (the first of the val split)")
    parser.add_argument("--thresholds", default="seed,fixed,mean,median,q3", help="comma-separated presets")
    parser.add_argument("--retrievals", default="prm_only,proposals", help="comma-separated methods")
    parser.add_argument("--before", default=None, help="another ranprm checkout to time one variant alone with")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny backbone, 64 px, 2 images, 2x1")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the data, e.g. data.image_size=128")
    args = parser.parse_args(argv)
    if args.quick:
        args.backbone, args.steps, args.images = "tiny", 2, 2
        args.thresholds, args.retrievals = "seed,mean", "prm_only"
        args.overrides = ["data.image_size=64", *args.overrides]
    args.thresholds = [t.strip() for t in args.thresholds.split(",") if t.strip()]
    args.retrievals = [r.strip() for r in args.retrievals.split(",") if r.strip()]
    if args.images < 1 or args.steps < 1 or not args.thresholds or not args.retrievals:
        parser.error("--images and --steps must be >= 1, --thresholds and --retrievals non-empty")
    return args


def _train(args: argparse.Namespace, folder: Path) -> Path:
    from ranprm.cli.config import compose
    from ranprm.train import train

    run = folder / "run"
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON line only
        train(compose("train", [
            f"backbone={args.backbone}", "trainer=cpu", f"+trainer.max_steps={args.steps}", "print_config=false",
            "+trainer.limit_val_batches=0", "optimized_metric=null", "logger=none", "callbacks.progress_bar=none",
            "callbacks.panels.num_images=0", "data.num_workers=0", f"paths.output_dir={run}", *args.overrides,
            *args.train_override,
        ]))  # fmt: skip
    return run / "checkpoints" / "last.ckpt"


def _timed(overrides: list[str]) -> float:
    from ranprm.cli.config import compose
    from ranprm.evaluate import evaluate

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON line only
        evaluate(compose("evaluate", overrides))
    return time.perf_counter() - start


def _single_in(tree: Path, overrides: list[str], out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", _SINGLE, json.dumps(overrides), str(out)], env=env, cwd=tree,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"the single-variant run in {tree} failed:\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["wall_s"])


def main(argv: list[str]) -> None:
    args = _parse_args(argv)
    from ranprm.cli.config import compose

    with tempfile.TemporaryDirectory(prefix="ranprm-bench-variants-") as tmp:
        folder = Path(tmp)
        ckpt = Path(args.ckpt) if args.ckpt else _train(args, folder)
        size = int(compose("train", args.overrides).data.image_size)
        base = [f"ckpt={ckpt}", f"eval.max_images={args.images}", "progress_bar=none", "logger=none",
                "data.num_workers=0", f"data.image_size={size}", *args.overrides]  # fmt: skip
        _timed([*base, f"output={folder / 'warm'}", "eval.max_images=1"])
        product = f"variants={{threshold:[{','.join(args.thresholds)}],retrieval:[{','.join(args.retrievals)}]}}"
        one_pass = _timed([*base, f"output={folder / 'one_pass'}", product])
        separate = 0.0
        for t in args.thresholds:
            for r in args.retrievals:
                separate += _timed([*base, f"output={folder / f'alone_{t}_{r}'}", f"threshold={t}", f"retrieval={r}"])
        record = json.loads((folder / "one_pass" / "metrics.json").read_text())
        single = [*base, f"threshold={args.thresholds[0]}", f"retrieval={args.retrievals[0]}"]
        here = Path(__file__).resolve().parents[2]
        after = _single_in(here, single, folder / "after")
        before = _single_in(Path(args.before).resolve(), single, folder / "before") if args.before else None
        predictions = {v["name"]: v["counts"].get("num_predictions") for v in record["variants"]}
        row: dict[str, Any] = {
            "case": "variants",
            "backbone": " ".join([args.backbone, *args.train_override]) if not args.ckpt else "ckpt",
            "size": size,
            "variants": len(record["variants"]),
            "images": args.images,
            "one_pass_s": round(one_pass, 2),
            "separate_s": round(separate, 2),
            "speedup": round(separate / one_pass, 2),
            "single_variant": f"{args.thresholds[0]}/{args.retrievals[0]}",
            "single_after_s": round(after, 2),
            "single_before_s": round(before, 2) if before is not None else None,
            "before_tree": args.before,
            "predictions_per_variant": predictions,
            "machine": machine("cpu"),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
