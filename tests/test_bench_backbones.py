"""`python -m ranprm.bench backbones`: the quick case runs and prints one complete JSON line per case."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ranprm.bench import backbones as bench

EXPECTED_KEYS = {"backbone", "size", "batch", "device", "fwd_s", "fwdbwd_s", "fwd_peak_mem_mb", "peak_mem_mb"}


def _rows(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.strip().splitlines()]


def test_quick_in_process_prints_one_line_per_backbone_and_size(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--quick", "--backbones", "tiny", "--sizes", "32,48", "--in-process", "--threads", "1"])
    rows = _rows(capsys.readouterr().out)
    assert [(r["backbone"], r["size"]) for r in rows] == [("tiny", 32), ("tiny", 48)]
    for row in rows:
        assert set(row) >= EXPECTED_KEYS
        assert row["batch"] == 2 and row["repeats"] == 1 and row["device"] == "cpu"
        assert row["fwd_s"] > 0 and row["fwdbwd_s"] > 0 and row["peak_mem_mb"] >= 0


def test_bad_options_exit_with_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench.main(["--quick", "--backbones", "nonesuch"])
    assert info.value.code == 2
    assert "nonesuch" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_isolated_run_from_the_command_line() -> None:
    """The default path: one subprocess per measurement (two here), as `make bench` runs it."""
    cmd = [sys.executable, "-m", "ranprm.bench", "backbones", "--quick", "--backbones", "tiny"]
    cmd += ["--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)
    (row,) = _rows(proc.stdout)
    assert set(row) >= EXPECTED_KEYS and row["isolated"] is True
    assert "fwd_error" not in row and "fwdbwd_error" not in row
