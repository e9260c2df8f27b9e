"""Human-readable forms of a `SuiteResult`: the per-class markdown table and the one-line summary."""

from __future__ import annotations

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
        value = values.get(c.mean) if c.mean else None
        mean.append("" if value is None else pct(value) if c.percent else str(value))
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
