"""`python -m ranprm.bench prm`: the quick case prints one complete JSON line per (mode, peaks)."""

from __future__ import annotations

import json

import pytest

from ranprm.bench import prm as bench

EXPECTED_KEYS = {
    "mode",
    "peaks",
    "backbone",
    "loop_s",
    "batched_s",
    "speedup",
    "max_abs_diff",
    "device",
    "size",
    "forward_s",
    "per_peak_vs_forward",
    "precision",
}


def _rows(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.strip().splitlines()]


def test_quick_run_prints_one_line_per_mode_and_peak_count(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--quick", "--size", "32"])
    rows = _rows(capsys.readouterr().out)
    cases = [(r["mode"], r["peaks"]) for r in rows]
    assert cases == [("probability", 1), ("probability", 4), ("gradient", 1), ("gradient", 4)]
    for row in rows:
        assert set(row) >= EXPECTED_KEYS
        assert row["backbone"] == "tiny" and row["size"] == 32 and row["device"] == "cpu"
        assert row["loop_s"] > 0 and row["batched_s"] > 0 and row["speedup"] > 0
        assert row["max_abs_diff"] < 1e-5


def test_an_unregistered_backbone_is_skipped_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--quick", "--size", "32", "--backbones", "nonesuch,tiny", "--peaks", "2", "--modes", "gradient"])
    out = capsys.readouterr()
    assert "nonesuch" in out.err and "skipped" in out.err
    assert [(r["backbone"], r["peaks"]) for r in _rows(out.out)] == [("tiny", 2)]


def test_bad_options_exit_with_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--quick", "--peaks", "0"],
        ["--quick", "--modes", "excitation"],
        ["--quick", "--size", "8"],
    ):
        with pytest.raises(SystemExit) as info:
            bench.main(argv)
        assert info.value.code == 2
    assert "--modes" in capsys.readouterr().err


def test_backbone_specs_carry_options_and_lists_survive_the_comma_split(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.parse_backbone_spec("timm/model=resnet18/output_stride=16") == (
        "timm",
        {"model": "resnet18", "output_stride": 16},
    )
    spec = bench.parse_backbone_spec("efficientnet_lite0/attention=[8,16]")
    assert spec == ("efficientnet_lite0", {"attention": [8, 16]})
    bench.main(["--quick", "--size", "32", "--backbones", "tiny/width=4,tiny/num_stages=2", "--peaks", "2",
                "--modes", "gradient"])  # fmt: skip
    rows = _rows(capsys.readouterr().out)
    assert [r["backbone"] for r in rows] == ["tiny/width=4", "tiny/num_stages=2"]
    assert all(r["forward_s"] > 0 and r["per_peak_vs_forward"] > 0 for r in rows)
