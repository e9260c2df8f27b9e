"""Human-readable forms of a `SuiteResult`: the per-class markdown table and the one-line summary; and the ranked
table of `ranprm-evaluate variants=...`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ranprm.eval.base import pct
from ranprm.eval.suite import SuiteResult


def per_class_table(result: SuiteResult) -> str:
    """Markdown table: one row per class and a mean row, one column per per-class column of the evaluators (AP in %,
    "–" where undefined), then the notes saying what the numbers are (the protocol among them)."""
    columns = [c for e in result.evaluations for c in e.columns]
    head = ["class", *(c.title for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    for i, name in enumerate(result.class_names):
        cells = [name] + [pct(c.values[i]) if c.percent else str(c.values[i]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    values = {**result.metrics, **result.counts}
    mean = ["**mean**"]
    for c in columns:
        if not c.mean or c.mean not in values:
            mean.append("")
        else:  # an undefined mean (None) is "–", as an undefined class's value
            mean.append(pct(values[c.mean]) if c.percent else str(values[c.mean]))
    lines.append("| " + " | ".join(mean) + " |")
    notes = [note for e in result.evaluations for note in e.notes]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def summary(result: SuiteResult) -> str:
    """One line: each evaluator's part (in %), with the protocol and the counts."""
    parts = [e.summary for e in result.evaluations if e.summary]
    counts = result.counts
    labels = (("num_images", "images"), ("num_gt", "GT"), ("num_predictions", "predictions"))
    shown = ", ".join(f"{counts[k]} {label}" for k, label in labels if k in counts)
    return f"[protocol {result.protocol}] " + " | ".join(parts) + (f" ({shown})" if shown else "")


def rank_variants(metrics: Sequence[Mapping[str, Any]], rank_by: str) -> list[int]:
    """Indices of the variants from best to worst by `metrics[i][rank_by]` (higher is better; a missing or NaN
    value last; ties keep the given order)."""

    def key(i: int) -> tuple[bool, float]:
        value = metrics[i].get(rank_by)
        missing = not isinstance(value, int | float) or math.isnan(value)
        return (missing, 0.0 if missing else -float(value))

    return sorted(range(len(metrics)), key=key)


TEXT_COLUMNS = 6  # rank, variant, threshold, retrieval, mask_grad, protocol: then the metrics


def variants_rows(entries: Sequence[Mapping[str, Any]], metric_names: Sequence[str]) -> tuple[list[str], list[list]]:
    """The variants table (`metrics.json`'s `variants`, already ranked): columns and rows, one row per variant:
    rank, name, the threshold preset, the retrieval method (and its size when set), the gradient path, the protocol,
    then each metric in `metric_names` (fractions, as in metrics.json; None where the protocol has no such metric)."""
    columns = ["rank", "variant", "threshold", "retrieval", "mask_grad", "protocol", *metric_names]
    rows = []
    for entry in entries:
        settings = entry["settings"]
        retrieval = settings["retrieval"]
        size = retrieval.get("size")
        rows.append([
            entry["rank"],
            entry["name"],
            settings["threshold"].get("name", "custom"),
            f"{retrieval.get('name')}" + (f"@{size}" if size else ""),
            settings.get("mask_grad") or "",
            entry.get("protocol") or "",
            *(entry["metrics"].get(m) for m in metric_names),
        ])  # fmt: skip
    return columns, rows


def variants_markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]], rank_by: str) -> str:
    """Markdown of `variants_rows`' table, metrics in % like per_class.md, ranked by `rank_by`."""
    aligns = ["---:"] + ["---"] * (TEXT_COLUMNS - 1) + ["---:"] * (len(columns) - TEXT_COLUMNS)
    lines = [f"Variants ranked by `{rank_by}` (metrics in %).", "",
             "| " + " | ".join(columns) + " |", "|" + "|".join(aligns) + "|"]  # fmt: skip
    for row in rows:
        cells = [str(v) for v in row[:TEXT_COLUMNS]]
        cells += [pct(v) if isinstance(v, int | float) else "–" for v in row[TEXT_COLUMNS:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
