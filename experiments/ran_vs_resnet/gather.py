"""Gather the study's runs into RESULTS.md (mean ± std over seeds) and results.png (bars with error bars).

    python experiments/ran_vs_resnet/gather.py [RUNS_DIR ...] [--out DIR]

RUNS_DIR: folders searched recursively for job folders (`metrics.json`, or `failed.json` for a failed job);
default: the newest folder under experiments/ran_vs_resnet/runs/. The table's cells are the evaluation jobs
(`ranprm.evaluate ckpt=...`: backbone and seed from the training job that wrote the checkpoint, threshold and
`backbone_overrides.mask_grad` from the evaluation's `.hydra/config.yaml`); where a run has no evaluations, the
training jobs' own instance metrics fill it (backbone.name, backbone.mask_grad, threshold.name, seed).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
METRICS = (
    ("map_r_25", "mAP^r@0.25"),
    ("map_r_50", "mAP^r@0.5"),
    ("map_r_75", "mAP^r@0.75"),
    ("abo", "ABO"),
    ("pointing_accuracy", "pointing acc."),
)
VARIANT_ORDER = ("ran", "ran (detached mask)", "resnet50")
THRESHOLD_ORDER = ("fixed", "mean", "median", "q3")


def _job_config(job_dir: Path) -> dict[str, Any]:
    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def _variant(backbone: str, mask_grad: str | None) -> str:
    if backbone.startswith("ran") and mask_grad == "detached":
        return f"{backbone} (detached mask)"
    return backbone


def _training_job_of(ckpt: str) -> Path:
    """An evaluated checkpoint `<training job>/checkpoints/last.ckpt` -> its training job folder."""
    return Path(ckpt).parent.parent


def load_jobs(roots: list[Path]) -> list[dict[str, Any]]:
    """One record per job folder: kind (train | eval), variant, threshold, seed, status, the instance metrics.

    An evaluation job (`ranprm.evaluate ckpt=...`) takes backbone and seed from the training job that wrote the
    checkpoint, and threshold and mask gradient path from its own config.
    """
    jobs = []
    dirs = sorted({p.parent for root in roots for name in ("metrics.json", "failed.json") for p in root.rglob(name)})
    for job_dir in dirs:
        cfg = _job_config(job_dir)
        summary = {}
        if (job_dir / "metrics.json").is_file():
            summary = json.loads((job_dir / "metrics.json").read_text())
        if cfg.get("ckpt"):
            kind, train_cfg = "eval", _job_config(_training_job_of(cfg["ckpt"]))
            instance = summary
            mask_grad = (cfg.get("backbone_overrides") or {}).get("mask_grad")
        else:
            kind, train_cfg = "train", cfg
            instance = summary.get("instance_metrics") or {}
            mask_grad = None
        backbone_cfg = train_cfg.get("backbone") or {}
        backbone = backbone_cfg.get("name") or summary.get("backbone", "?")
        threshold = (
            (cfg.get("threshold") or {}).get("name")
            or (train_cfg.get("threshold") or {}).get("name")
            or summary.get("threshold", "?")
        )
        record = {
            "dir": job_dir,
            "kind": kind,
            "backbone": backbone,
            "variant": _variant(backbone, mask_grad or backbone_cfg.get("mask_grad")),
            "threshold": threshold if isinstance(threshold, str) else threshold.get("name", "?"),
            "seed": train_cfg.get("seed"),
            "status": "ok" if summary else "failed",
            "wall_s": summary.get("wall_s"),
            "cls_map": instance.get("cls_map", (summary.get("metrics") or {}).get("val/cls_map")),
            "metrics": {},
        }
        for key, _ in METRICS:
            value = instance.get(key, (summary.get("metrics") or {}).get(f"val/{key}"))
            if value is not None:
                record["metrics"][key] = float(value)
        jobs.append(record)
    return jobs


def has_evaluations(jobs: list[dict[str, Any]]) -> bool:
    """True for the study's layout (checkpoints evaluated per variant), False for training-only runs."""
    return any(j["kind"] == "eval" for j in jobs)


def grid_cells(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs that fill the table: the evaluations where there are any, else the training jobs themselves."""
    return [j for j in jobs if j["kind"] == "eval"] if has_evaluations(jobs) else jobs


def training_lines(jobs: list[dict[str, Any]]) -> list[str]:
    """A small table of the trained models (present when the grid comes from evaluations of them)."""
    trained = [j for j in jobs if j["kind"] == "train"]
    if not trained or not has_evaluations(jobs):
        return []
    lines = [
        "Trained models (each is evaluated under every threshold and gradient path below):",
        "",
        "| backbone | trained | failed | val cls mAP | training wall time |",
        "|---|---|---|---|---|",
    ]
    for backbone in _order({j["backbone"] for j in trained}, VARIANT_ORDER):
        members = [j for j in trained if j["backbone"] == backbone]
        ok = [j for j in members if j["status"] == "ok"]
        maps = [float(j["cls_map"]) for j in ok if j["cls_map"] is not None]
        walls = [float(j["wall_s"]) for j in ok if j["wall_s"] is not None]
        cls_map = _cell((statistics.fmean(maps), statistics.stdev(maps) if len(maps) > 1 else 0.0, len(maps)))
        wall = f"{statistics.fmean(walls) / 60:.1f} min per model" if walls else "–"
        lines.append(f"| {backbone} | {len(ok)} | {len(members) - len(ok)} | {cls_map if maps else '–'} | {wall} |")
    return [*lines, ""]


def _order(values: set[str], preferred: tuple[str, ...]) -> list[str]:
    return [v for v in preferred if v in values] + sorted(values - set(preferred))


def aggregate(jobs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(variant, threshold) -> n ok, n failed, seeds, and per metric (mean, std, n); std is the sample std."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for job in jobs:
        groups[(job["variant"], job["threshold"])].append(job)
    out = {}
    for key, members in groups.items():
        ok = [j for j in members if j["status"] == "ok"]
        stats = {}
        for metric, _ in METRICS:
            values = [j["metrics"][metric] for j in ok if metric in j["metrics"]]
            if values:
                mean = statistics.fmean(values)
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                stats[metric] = (mean, std, len(values))
        out[key] = {
            "n_ok": len(ok),
            "n_failed": len(members) - len(ok),
            "seeds": sorted(str(j["seed"]) for j in ok),
            "wall_s": sum(j["wall_s"] or 0.0 for j in ok),
            "stats": stats,
        }
    return out


def paired_lines(jobs: list[dict[str, Any]], a: str = "ran", b: str = "ran (detached mask)") -> list[str]:
    """Per-seed differences a - b where both variants were evaluated on the same trained models (same seed)."""
    cells = {(j["variant"], j["threshold"], j["seed"]): j["metrics"] for j in grid_cells(jobs) if j["status"] == "ok"}
    if not has_evaluations(jobs) or not any(key[0] == b for key in cells):
        return []
    lines = [
        f"Paired on the same models: `{a}` − `{b}`, in points, per seed (mean ± sample std; `k/n` = seeds where "
        "the full gradient path is higher):",
        "",
        "| threshold | " + " | ".join(label for _, label in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for threshold in _order({k[1] for k in cells}, THRESHOLD_ORDER):
        seeds = sorted({k[2] for k in cells if k[1] == threshold and (a, threshold, k[2]) in cells
                        and (b, threshold, k[2]) in cells}, key=str)  # fmt: skip
        if not seeds:
            continue
        row = []
        for metric, _ in METRICS:
            diffs = [
                100 * (cells[(a, threshold, s)][metric] - cells[(b, threshold, s)][metric])
                for s in seeds
                if metric in cells[(a, threshold, s)] and metric in cells[(b, threshold, s)]
            ]
            if not diffs:
                row.append("–")
                continue
            std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            row.append(f"{statistics.fmean(diffs):+.1f} ± {std:.1f} ({sum(d > 0 for d in diffs)}/{len(diffs)})")
        lines.append(f"| {threshold} | " + " | ".join(row) + " |")
    return [*lines, ""]


def _cell(stat: tuple[float, float, int] | None) -> str:
    if stat is None:
        return "–"
    mean, std, _ = stat
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def write_results(table: dict, jobs: list[dict[str, Any]], roots: list[Path], out: Path) -> Path:
    variants = _order({k[0] for k in table}, VARIANT_ORDER)
    thresholds = _order({k[1] for k in table}, THRESHOLD_ORDER)
    lines = ["# RAN-PRM vs ResNet-PRM: results", ""]
    for root in roots:
        info_path = root / "run_info.json"
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            lines += [
                f"- Run `{root.name}`: started {info.get('started')}, wall time {info.get('wall_s', 0) / 3600:.2f} h",
                f"  - machine: {info.get('machine')}; GPU: {info.get('gpu') or 'none'}; torch {info.get('torch')}",
                f"  - epochs {info.get('epochs')}, seeds {info.get('seeds')}, "
                f"extra overrides: `{info.get('extra_overrides') or 'none'}`",
            ]
        else:
            lines.append(f"- Runs from `{root}` (no run_info.json)")
    cells = grid_cells(jobs)
    n_failed = sum(j["status"] != "ok" for j in cells)
    lines += [
        f"- {len(cells)} jobs, {n_failed} failed. Values in %, mean ± sample std over seeds (n per row).",
        "",
        *training_lines(jobs),
        "| backbone | threshold | n | " + " | ".join(label for _, label in METRICS) + " |",
        "|---|---|---|" + "---|" * len(METRICS),
    ]
    for variant in variants:
        for threshold in thresholds:
            row = table.get((variant, threshold))
            if row is None:
                continue
            n = f"{row['n_ok']}" + (f" ({row['n_failed']} failed)" if row["n_failed"] else "")
            cells = [_cell(row["stats"].get(metric)) for metric, _ in METRICS]
            lines.append(f"| {variant} | {threshold} | {n} | " + " | ".join(cells) + " |")
    lines += ["", *paired_lines(jobs), "![results](results.png)", ""]
    lines += ["What these numbers do and do not show: [README.md](README.md#results) in this folder.", ""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


def plot(table: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = _order({k[0] for k in table}, VARIANT_ORDER)
    thresholds = _order({k[1] for k in table}, THRESHOLD_ORDER)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6), sharey=False)
    width = 0.8 / max(len(variants), 1)
    for ax, (metric, label) in zip(axes, METRICS, strict=True):
        for i, variant in enumerate(variants):
            means, stds = [], []
            for threshold in thresholds:
                stat = (table.get((variant, threshold)) or {}).get("stats", {}).get(metric)
                means.append(100 * stat[0] if stat else math.nan)
                stds.append(100 * stat[1] if stat else 0.0)
            xs = [t + (i - (len(variants) - 1) / 2) * width for t in range(len(thresholds))]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=variant)
        ax.set_xticks(range(len(thresholds)), thresholds)
        ax.set_title(label)
        ax.set_ylabel("%")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("RAN-PRM vs ResNet-PRM (mean ± std over seeds)")
    fig.tight_layout()
    path = out / "results.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run folders (default: the newest under runs/)")
    parser.add_argument("--out", type=Path, default=HERE, help="where RESULTS.md and results.png go")
    args = parser.parse_args(argv)
    roots = args.runs
    if not roots:
        candidates = sorted(p for p in (HERE / "runs").glob("*") if p.is_dir())
        if not candidates:
            parser.error(f"no runs under {HERE / 'runs'}; run run.sh first or pass a folder")
        roots = [candidates[-1]]
    jobs = load_jobs(roots)
    if not jobs:
        parser.error(f"no metrics.json or failed.json under {', '.join(map(str, roots))}")
    table = aggregate(grid_cells(jobs))
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_results(table, jobs, roots, args.out)}")
    print(f"wrote {plot(table, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
