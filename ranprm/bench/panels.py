"""`python -m ranprm.bench panels`: the time to render one panel (`ranprm.viz.panels.render_panel`), by tile size.

One JSON line per size:

    {"case": "panels", "size": 192, "render_ms": ..., "panel_hw": [H, W], "repeats": 30, "machine": ...}

The panel is a busy one (like the panel tests'): a `size` x `size` image, 3 valid classes of 4 with 2 peaks each
(6 PRMs), 3 instances, 3 GT masks and 3 attention maps (48, 24, 12 px), all random with `--seed`. `render_ms` is
the median of `--repeats` renders after 3 untimed ones; PNG encoding is not included. The callback's own cost is
its inference (BENCHMARKS.md, "Panels"), which `python -m ranprm.bench predict` measures.
"""

from __future__ import annotations

import argparse
import json

import torch

from ranprm.bench.common import int_list, machine, median_seconds
from ranprm.prm.instances import Instances
from ranprm.viz.panels import PanelInputs, layout_for, render_panel

NAMES = ("cat", "dog", "person", "car")


def busy_inputs(size: int, seed: int = 0) -> PanelInputs:
    """The benchmark's panel: every row present, maps at their usual resolutions (CRM 6 x 6, PRMs at the image)."""
    g = torch.Generator().manual_seed(seed)
    h = w = size
    boxes = [(int(size * (0.05 + 0.15 * i)), int(size * (0.3 + 0.15 * i)), int(size * 0.1 * (1 + i)),
              int(size * (0.4 + 0.1 * i))) for i in range(3)]  # fmt: skip
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    peaks = torch.tensor([[c, size * (0.15 + 0.5 * i), size * (0.2 + 0.2 * c)] for c in range(3) for i in range(2)])
    inst = Instances(
        (h, w),
        masks=masks,
        labels=torch.tensor([0, 1, 2]),
        scores=torch.tensor([0.9, 0.7, 0.5]),
        peaks=peaks[::2, 1:].clone(),
        prms=torch.rand(3, h, w, generator=g),
    )
    return PanelInputs(
        image=torch.rand(3, h, w, generator=g),
        class_names=NAMES,
        crms=torch.randn(4, 6, 6, generator=g),
        valid_classes=torch.tensor([0, 1, 2]),
        peaks=peaks,
        prms=torch.rand(6, h, w, generator=g),
        instances=inst,
        gt_masks=masks,
        gt_labels=torch.tensor([0, 1, 2]),
        attention=[torch.rand(s, s, generator=g) for s in (48, 24, 12)],
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m ranprm.bench panels", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="192,448", help="comma-separated image (= tile) sides in pixels")
    parser.add_argument("--repeats", type=int, default=30, help="timed renders per size; the median is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 px, 3 repeats")
    args = parser.parse_args(argv)
    sizes = [64] if args.quick else int_list(args.sizes, "--sizes", parser, minimum=8)
    repeats = 3 if args.quick else args.repeats
    for size in sizes:
        inputs = busy_inputs(size, args.seed)
        seconds = median_seconds(lambda inputs=inputs: render_panel(inputs), "cpu", repeats, warmup=3)
        row = {
            "case": "panels",
            "size": size,
            "render_ms": round(seconds * 1e3, 2),
            "panel_hw": list(layout_for(inputs).size),
            "repeats": repeats,
            "machine": machine("cpu"),
        }
        print(json.dumps(row), flush=True)
