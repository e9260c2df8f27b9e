"""How many classes per image each threshold preset keeps, and at what probabilities, for one checkpoint.

    python -m experiments.devset.class_counts --ckpt RUN/checkpoints/last.ckpt data=coco data.root=... \
        data.train_split=train data.val_split=val data.image_size=256

The trailing arguments are the training command's `data` overrides (they name the validation split). The class
scores are the inference class test's (`PRMModule.calibration_scores`: eval mode, fp32), taken once; each preset of
conf/threshold/ is then applied to them with `select_classes`, as inference applies it. `class_q3` uses the
checkpoint's stored calibration, else the validation scores themselves (flagged: calibrated on the judged images).
Prints one markdown row per preset: classes kept per image (mean, min, max), the sigmoid probabilities of the kept
classes (min and median), and the kept classes' precision and recall against the image-level GT labels.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ranprm.cli.config import compose, to_plain
from ranprm.data.datamodule import DataConfig, VOCDataModule
from ranprm.errors import RanprmError
from ranprm.lightning.checkpoint import load_module
from ranprm.prm.thresholds.selection import ClassCalibration, Thresholds, select_classes

PRESETS = ("seed", "fixed", "mean", "q3", "class_q3")
THRESHOLD_DIR = Path(__file__).resolve().parents[2] / "conf" / "threshold"


def preset_rows(scores: torch.Tensor, labels: torch.Tensor, calibration: ClassCalibration) -> list[dict[str, float]]:
    """Per preset: kept classes per image and their probabilities, precision and recall against `labels` (N, C)."""
    rows = []
    probs = torch.sigmoid(scores)
    for name in PRESETS:
        cfg = to_plain(OmegaConf.load(THRESHOLD_DIR / f"{name}.yaml"))
        kept = select_classes(scores, Thresholds.from_config(cfg, calibration))
        per_image = kept.sum(1).float()
        kept_probs = probs[kept]
        hits = float((kept & (labels > 0)).sum())
        rows.append(
            {
                "preset": name,
                "mean": float(per_image.mean()),
                "min": float(per_image.min()),
                "max": float(per_image.max()),
                "p_min": float(kept_probs.min()) if kept_probs.numel() else float("nan"),
                "p_median": float(kept_probs.median()) if kept_probs.numel() else float("nan"),
                "precision": hits / max(float(kept.sum()), 1.0),
                "recall": hits / max(float((labels > 0).sum()), 1.0),
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("overrides", nargs="*", help="the training command's data overrides")
    args = parser.parse_args(argv)
    try:
        cfg = compose("train", list(args.overrides))
        datamodule = VOCDataModule(DataConfig.from_config(to_plain(cfg.data)), seed=cfg.seed)
        datamodule.setup("validate")
        module = load_module(args.ckpt, datamodule.class_names)
        loader = datamodule.val_dataloader()
        scores = module.calibration_scores(loader)
        labels = torch.cat([batch["labels"] for batch in loader]).float()
    except RanprmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    calibration = module.class_calibration or ClassCalibration(scores, "validation split itself", True)
    print(f"{args.ckpt}: {len(scores)} images, {int((labels > 0).sum())} GT image-level labels; "
          f"class_q3 calibrated on: {calibration.split}")  # fmt: skip
    print("| preset | classes kept per image: mean (min-max) | kept classes' probability: min, median "
          "| precision | recall |")  # fmt: skip
    print("|---|---|---|---:|---:|")
    for r in preset_rows(scores, labels, calibration):
        print(f"| `{r['preset']}` | {r['mean']:.2f} ({r['min']:.0f}-{r['max']:.0f}) | {r['p_min']:.2f}, "
              f"{r['p_median']:.2f} | {r['precision']:.2f} | {r['recall']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
