"""`python -m ranprm.bench predict`: end-to-end predict latency per image, split by stage.

One JSON line per retrieval method:

    {"case": "predict", "backbone": "ran", "size": 128, "retrieval": "prm_only", "images": 8,
     "forward_s": ..., "select_s": ..., "prm_s": ..., "retrieval_s": ..., "total_s": ..., "peaks_per_image": ...,
     "prm_s_per_peak": ..., ...}

Each image runs alone (batch 1, as `ranprm-predict` does) through `PRMModule.predict_images`, the code
`ranprm-predict` and `ranprm-evaluate` use: `forward` (network and class scores), `select` (valid classes and
peaks), `prm` (peak backprop of every valid peak, fp32), `retrieval` (instances at the original size). Stage
figures are medians over the images after one untimed image; `total_s` is the median of the per-image totals.

The model is `--ckpt` (a trained checkpoint: realistic peak counts) or, without one, a freshly initialised
`--backbone`, whose peak count is whatever its random CRMs give (`peaks_per_image` says; `prm_s_per_peak` is
the comparable figure). Images are the first `--images` of the validation split of the data that the trailing
Hydra overrides choose (default: the embedded synthetic data), e.g. `data=voc data.root=/data/VOC2012`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import torch

from ranprm.bench.common import machine


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ranprm.bench predict", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="a trained checkpoint (default: an untrained --backbone)")
    parser.add_argument("--backbone", default="ran", help="registry name when no --ckpt is given")
    parser.add_argument("--size", type=int, default=None, help="network input side (default: ckpt's or data's)")
    parser.add_argument("--images", type=int, default=8, help="timed images")
    parser.add_argument("--retrieval", default="prm_only,proposals", help="comma-separated: prm_only,proposals")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny backbone, 64 px, 2 images")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the data, e.g. data.image_size=448")
    args = parser.parse_args(argv)
    if args.quick:
        args.backbone, args.size, args.images = "tiny", args.size or 64, min(args.images, 2)
    args.retrieval = [r.strip() for r in args.retrieval.split(",") if r.strip()]
    if not args.retrieval or any(r not in ("prm_only", "proposals") for r in args.retrieval):
        parser.error(f"--retrieval={','.join(args.retrieval)!r}: choose from prm_only,proposals")
    if args.images < 1 or (args.size is not None and args.size < 32):
        parser.error("--images must be >= 1 and --size >= 32")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here; use --device cpu")
    return args


def _model(args: argparse.Namespace, cfg: Any, class_names: tuple[str, ...]) -> tuple[Any, int]:
    """(PRMModule in eval mode, network input side)."""
    from ranprm.cli.build import build_module
    from ranprm.lightning.checkpoint import load_module

    if args.ckpt:
        module = load_module(args.ckpt)
        return module, args.size or module.hparams.get("image_size") or int(cfg.data.image_size)
    torch.manual_seed(0)
    module = build_module(cfg, class_names)
    return module.eval(), args.size or int(cfg.data.image_size)


def main(argv: list[str]) -> None:
    args = _parse_args(argv)
    from omegaconf import OmegaConf

    from ranprm.cli.config import compose
    from ranprm.data.datamodule import DataConfig, VOCDataModule
    from ranprm.data.transforms import build_transform
    from ranprm.data.voc import read_image

    cfg = compose("train", [f"backbone={args.backbone}", *args.overrides])
    data = VOCDataModule(DataConfig.from_config(OmegaConf.to_container(cfg.data, resolve=True)))
    module, size = _model(args, cfg, data.class_names)
    module = module.to(args.device)
    transform = build_transform(size, train=False)
    _, val_ids = data.split_ids()
    samples = []
    for image_id in val_ids[: args.images + 1]:  # the first one is the untimed warm-up
        image = read_image(data.source.image_path(image_id))  # any data=: VOC layout or COCO format
        raw = image.permute(1, 2, 0).numpy()
        samples.append((transform(image)[None].to(args.device), (int(image.shape[1]), int(image.shape[2])), raw))

    for retrieval in args.retrieval:
        module.hparams.retrieval = dict(compose("train", [f"retrieval={retrieval}"]).retrieval)
        per_image: list[dict[str, float]] = []
        peaks = []
        for i, (batch, orig_size, raw) in enumerate(samples):
            times: dict[str, float] = {}
            (prediction,) = module.predict_images(batch, [orig_size], [raw], stage_times=times)
            if i > 0 or len(samples) == 1:
                per_image.append(times)
                peaks.append(len(prediction.peaks))
        row: dict[str, Any] = {"case": "predict", "backbone": module.hparams.backbone["name"], "size": size}
        row |= {"retrieval": retrieval, "images": len(per_image), "device": args.device}
        row |= {"machine": machine(args.device), "torch": torch.__version__, "ckpt": args.ckpt}
        for name in ("forward", "select", "prm", "retrieval"):
            row[f"{name}_s"] = round(statistics.median(t.get(name, 0.0) for t in per_image), 4)
        row["total_s"] = round(statistics.median(sum(t.values()) for t in per_image), 4)
        row["peaks_per_image"] = round(statistics.fmean(peaks), 2)
        prm_total = sum(t.get("prm", 0.0) for t in per_image)
        row["prm_s_per_peak"] = round(prm_total / sum(peaks), 4) if sum(peaks) else None
        row["threads"] = torch.get_num_threads()
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
