"""`python -m experiments.attention_prm` (also `make study`): the attention-PRM study, cell by cell.

    python -m experiments.attention_prm                       # run every missing cell, then write the report
    python -m experiments.attention_prm --budget-min 150      # start no cell that would end after 150 minutes
    python -m experiments.attention_prm --list                # every cell: done / missing / unavailable, estimates
    python -m experiments.attention_prm --only 'synthetic256/*/seed0,devset/lite0*'   # some cells only
    python -m experiments.attention_prm --report              # RESULTS.md and results.png only; trains nothing
    python -m experiments.attention_prm --grid smoke          # seconds per cell: proves the path, answers nothing

Cells are written to `<out>/cells/<data>__<trunk>__seed<k>.json` (default out: this folder for the main grid);
checkpoints and run folders to `--scratch` (default `outputs/study/<grid>/`, ignored by git). README.md in this
folder describes the grid and the cell files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.attention_prm.grid import GRIDS
from experiments.attention_prm.report import write_report
from experiments.attention_prm.runner import ROOT, plan, run_grid, select

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.attention_prm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--grid", choices=sorted(GRIDS), default="main", help="which grid (default: main)")
    parser.add_argument("--out", type=Path, help="the study folder: cells/, RESULTS.md, results.png")
    parser.add_argument("--scratch", type=Path, help="checkpoints and run folders (outside git)")
    parser.add_argument("--budget-min", type=float, help="start no cell estimated to end after this many minutes")
    parser.add_argument("--only", help="comma-separated shell patterns of cell ids, e.g. 'devset/*/seed0'")
    parser.add_argument("--list", action="store_true", help="list the cells and their state; run nothing")
    parser.add_argument("--report", action="store_true", help="regenerate RESULTS.md and results.png only")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the images (default 1000)")
    parser.add_argument(
        "--boot-all",
        action="store_true",
        help="bootstrap intervals for every variant, not only the headline one (slow on a CPU)",
    )
    args = parser.parse_args(argv)
    if args.budget_min is not None and args.budget_min <= 0:
        parser.error(f"--budget-min {args.budget_min:g} must be positive")
    if args.n_boot < 0:
        parser.error(f"--n-boot {args.n_boot} must be 0 (no interval) or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    grid = GRIDS[args.grid]()
    scratch = (args.scratch or ROOT / "outputs" / "study" / grid.name).expanduser().resolve()
    out = (args.out or (HERE if grid.name == "main" else scratch / "results")).expanduser().resolve()
    cells = select(grid.cells(), args.only)
    if args.only and not cells:
        print(f"--only {args.only!r} matches no cell; `--list` shows their ids", file=sys.stderr)
        return 2
    if args.list:
        for row in plan(grid, out, cells):
            detail = row.reason or f"~{row.minutes:.0f} min"
            print(f"{row.cell.id:40s} {row.state:12s} {detail}")
        return 0
    code = 0
    if not args.report:
        code = run_grid(grid, out, scratch, cells, args.budget_min)
        if code >= 128:  # interrupted: the report can be made later from what exists
            return code
    write_report(grid, out, n_boot=args.n_boot, boot_all=args.boot_all)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
