"""`python -m ranprm.bench CASE [options]`: benchmarks, one module per case, each printing one JSON line per run.

Cases live in their own modules (`ranprm.bench.<case>`) with a `main(argv: list[str]) -> None`; they are imported
only when asked for, so one case's heavy imports never slow another.
"""

from __future__ import annotations

import importlib
import sys

CASES: dict[str, str] = {
    "gemm": "ranprm.bench.gemm",  # the machine's dense matmul rate: the reference for efficiency
    "train": "ranprm.bench.train",  # training-step throughput, memory and efficiency per backbone
    "loader": "ranprm.bench.loader",  # data-loader throughput against the training step's consumption
    "predict": "ranprm.bench.predict",  # end-to-end predict latency per image, by stage
    "backbones": "ranprm.bench.backbones",  # forward / forward+backward time and memory per backbone
    "prm": "ranprm.bench.prm",  # batched vs looped peak backpropagation
    "panels": "ranprm.bench.panels",  # the time to render one CRM/PRM panel
    "variants": "ranprm.bench.variants",  # ranprm-evaluate variants= in one pass vs one evaluation per variant
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["all"]:  # `make bench`: every case with its default (real-size) settings
        for case in CASES.values():
            importlib.import_module(case).main(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in CASES:
        known = ", ".join(sorted(CASES))
        print(f"usage: python -m ranprm.bench CASE [options]   (CASE: all, {known}; CASE --help for its options)")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    importlib.import_module(CASES[argv[0]]).main(argv[1:])
