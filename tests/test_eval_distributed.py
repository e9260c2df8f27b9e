"""Evaluators under DDP: two processes (gloo on CPU) that each see half of the images, with the padding a
`DistributedSampler` adds, compute exactly what one process computes on all the images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ranprm.eval import STANDARD_EVALUATORS, Boxes, EvalConfig, EvaluatorSuite, GroundTruth, InstanceMasks, Prediction
from ranprm.prm.instances import Instances
from tests.eval_cases import random_cases

CLASSES = ("a", "b", "c")
PROTOCOLS = ("voc", "coco")
WORLD = 2


def _inputs() -> tuple[list[GroundTruth], list[Prediction]]:
    """9 images with every input the standard evaluators read; the same in every process (seeded)."""
    g = torch.Generator().manual_seed(11)
    gts, preds = [], []
    for c in random_cases(4, num_images=9):
        size = tuple(c.void.shape)
        n = len(c.pred_labels)
        ys, xs = torch.arange(size[0]), torch.arange(size[1])
        xyxy = [[xs[m.any(0)].min(), ys[m.any(1)].min(), xs[m.any(0)].max(), ys[m.any(1)].max()] for m in c.gt_masks]
        boxes = Boxes(torch.tensor(xyxy, dtype=torch.float64).reshape(-1, 4), c.gt_labels,
                      torch.zeros(len(xyxy), dtype=torch.bool))  # fmt: skip
        gts.append(
            GroundTruth(
                c.image_id,
                size,
                InstanceMasks(c.gt_masks, c.gt_labels, c.void),
                boxes,
                class_targets=torch.bincount(c.gt_labels, minlength=len(CLASSES)).clamp_max(1),
            )
        )
        peaks = torch.rand(n, 2, generator=g) * torch.tensor(size)
        preds.append(
            Prediction(
                instances=Instances(size, c.pred_masks, c.pred_labels, c.pred_scores, peaks, torch.zeros(n, *size)),
                peaks_yx=peaks,
                peak_labels=c.pred_labels,
                class_scores=torch.randn(len(CLASSES), generator=g),
                class_max_yx=torch.rand(len(CLASSES), 2, generator=g) * torch.tensor(size),
            )
        )
    return gts, preds


def _evaluate(rows: list[int]) -> dict[str, dict]:
    gts, preds = _inputs()
    out = {}
    for protocol in PROTOCOLS:
        suite = EvaluatorSuite(CLASSES, EvalConfig(protocol=protocol, metrics=STANDARD_EVALUATORS))
        for start in range(0, len(rows), 2):  # batches of 2
            batch = rows[start : start + 2]
            suite.update([gts[i] for i in batch], [preds[i] for i in batch])
        out[protocol] = suite.compute().to_record()
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        images = list(range(9))
        padded = images + images[: (-len(images)) % WORLD]  # DistributedSampler repeats images to even the split
        result = _evaluate(padded[rank::WORLD])
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result, sort_keys=True))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two subprocesses
def test_two_processes_equal_one_process_on_all_images(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    single = json.loads(json.dumps(_evaluate(list(range(9))), sort_keys=True))
    for rank in range(WORLD):
        gathered = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert gathered == single
    for protocol in PROTOCOLS:
        # every standard metric was computed, over all 9 images, not a rank's share
        assert single[protocol]["num_images"] == 9
        assert {"map_r_50", "abo", "pointing_accuracy", "pointing_map", "cls_map"} <= set(single[protocol])
        assert all(not math.isnan(single[protocol][name]) for name in single[protocol]["metric_names"])
