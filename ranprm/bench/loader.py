"""`python -m ranprm.bench loader`: training data-loader throughput, against the training step's consumption.

One JSON line per worker count:

    {"case": "loader", "workers": 2, "batch": 16, "size": 128, "startup_s": ..., "images_per_s": ...,
     "step_images_per_s": ..., "headroom": ..., ...}

It iterates `VOCDataModule.train_dataloader()` exactly as training does (decode, resize, flip, normalise,
collate, pinned memory on CUDA machines, persistent workers) with nothing consuming the batches:
- `startup_s`: from creating the iterator to the first batch (worker start-up and the first decodes);
- `images_per_s`: steady state over `--batches` batches, after the batches the workers prefetched during
  start-up are drained (epochs wrap around);
- `headroom` = images_per_s / `--step-images-per-s` (the train step's rate, e.g. `images_per_s` from
  `ranprm.bench train`): at least 3 means the loader keeps the step fed with room to spare.
The data is what the trailing Hydra overrides choose, as for `ranprm.train` (default: the embedded synthetic
data at its default size), e.g. `data=voc data.root=/data/VOC2012 data.image_size=448`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from ranprm.bench.common import int_list, machine
from ranprm.utils.timing import sync


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ranprm.bench loader", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default: data.num_workers)")
    parser.add_argument("--batches", type=int, default=50, help="timed batches after the first")
    parser.add_argument("--step-images-per-s", type=float, default=None, help="the train step's rate, for headroom")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 batches")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the batches go (pinning)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the data, e.g. data.image_size=448")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches = min(args.batches, 3)
    if args.batches < 1:
        parser.error("--batches must be >= 1")
    if args.workers is not None:
        args.workers = int_list(args.workers, "--workers", parser, minimum=0)
    return args


def loader_throughput(data_cfg: dict[str, Any], batches: int, device: str = "cpu") -> dict[str, float]:
    """Start-up seconds and steady-state images/s of the training loader that `data_cfg` describes.

    With `device="cuda"` each batch's images are also copied to the GPU (non-blocking from pinned memory), as
    Lightning does before the step.
    """
    from ranprm.data.datamodule import DataConfig, VOCDataModule

    datamodule = VOCDataModule(DataConfig.from_config(data_cfg))
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    startup = time.perf_counter() - start

    def next_batch() -> dict[str, Any]:
        nonlocal iterator
        try:
            return next(iterator)
        except StopIteration:  # a new epoch, as training would start one (persistent workers are reused)
            iterator = iter(loader)
            return next(iterator)

    # Drain what the workers prefetched during start-up, so the timed batches are produced while timed.
    for _ in range(loader.num_workers * (loader.prefetch_factor or 0)):
        next_batch()
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        batch = next_batch()
        if "image" in batch:
            images += len(batch["image"])
            batch["image"].to(device, non_blocking=True)
    sync(device)
    return {"startup_s": round(startup, 3), "images_per_s": round(images / (time.perf_counter() - start), 2)}


def main(argv: list[str]) -> None:
    args = _parse_args(argv)
    from omegaconf import OmegaConf

    from ranprm.cli.config import compose

    data_cfg = OmegaConf.to_container(compose("train", args.overrides).data, resolve=True)
    assert isinstance(data_cfg, dict)
    for workers in args.workers or [int(data_cfg["num_workers"])]:
        cfg = data_cfg | {"num_workers": workers}
        row: dict[str, Any] = {"case": "loader", "workers": workers, "batch": cfg["batch_size"]}
        row |= {
            "size": cfg["image_size"],
            "data": cfg["name"],
            "device": args.device,
            "pin_memory": cfg["pin_memory"] and torch.cuda.is_available(),
        }
        row |= {"persistent_workers": cfg["persistent_workers"] and workers > 0, "batches": args.batches}
        row |= {"machine": machine("cpu"), "torch": torch.__version__}
        row |= loader_throughput(cfg, args.batches, args.device)
        if args.step_images_per_s:
            row["step_images_per_s"] = args.step_images_per_s
            row["headroom"] = round(row["images_per_s"] / args.step_images_per_s, 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
