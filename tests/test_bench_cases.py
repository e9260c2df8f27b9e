"""The gemm, train, loader and predict bench cases run on tiny sizes and report consistent figures.

No speed is asserted (that is BENCHMARKS.md's job); the checks are on what each row must hold.
"""

from __future__ import annotations

import json

import pytest
import torch

from ranprm.bench import gemm, loader, predict, train
from tests.helpers import CLASSES


def _rows(capsys: pytest.CaptureFixture[str]) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


def _data(voc_root) -> list[str]:
    return [
        f"data.root={voc_root}",
        f"data.class_names=[{','.join(CLASSES)}]",
        "data.image_size=64",
        "data.batch_size=2",
        "data.num_workers=0",
    ]


def test_gemm_rate_is_positive_per_dtype(capsys) -> None:
    gemm.main(["--quick", "--dtypes", "fp32,bf16"])
    rows = _rows(capsys)
    assert [r["dtype"] for r in rows] == ["fp32", "bf16"]
    assert all(r["tflops"] > 0 and r["n"] == 256 for r in rows)


def test_train_case_counts_flops_that_scale_with_the_batch(capsys) -> None:
    for batch in (1, 2):
        train.main(["--quick", "--in-process", "--batch", str(batch), "--precisions", "fp32,bf16"])
    one_fp32, one_bf16, two_fp32, _ = _rows(capsys)
    assert (one_fp32["precision"], one_bf16["precision"]) == ("fp32", "bf16")
    # the counted FLOPs are the model's, whatever the precision, and twice as many for twice the images
    assert one_fp32["gflop_per_step"] == one_bf16["gflop_per_step"] > 0
    assert two_fp32["gflop_per_step"] == pytest.approx(2 * one_fp32["gflop_per_step"], rel=0.05)
    for row in (one_fp32, two_fp32):
        assert row["images_per_s"] == pytest.approx(row["batch"] / row["step_s"], rel=1e-2)
        achieved = row["gflop_per_step"] / row["step_s"] / 1e3
        assert row["achieved_tflops"] == pytest.approx(achieved, rel=1e-2, abs=1e-4)
        assert row["efficiency"] == pytest.approx(row["achieved_tflops"] / row["gemm_tflops"], rel=2e-2, abs=1e-3)


def test_train_case_with_compile_and_nchw(capsys) -> None:
    train.main(["--quick", "--in-process", "--compile", "--no-channels-last"])
    (row,) = _rows(capsys)
    assert row["compile"] is True and row["channels_last"] is False and row["step_s"] > 0


def test_loader_case_reports_throughput_and_headroom(voc_root, capsys) -> None:
    loader.main(["--quick", "--workers", "0", "--step-images-per-s", "4", *_data(voc_root)])
    (row,) = _rows(capsys)
    assert row["workers"] == 0 and row["batch"] == 2 and row["size"] == 64
    assert row["images_per_s"] > 0 and row["headroom"] == pytest.approx(row["images_per_s"] / 4, rel=1e-2)


def test_predict_case_splits_latency_by_stage(voc_root, capsys) -> None:
    predict.main(["--quick", "--retrieval", "prm_only", "--images", "1", *_data(voc_root)])
    (row,) = _rows(capsys)
    stages = [row[f"{s}_s"] for s in ("forward", "select", "prm", "retrieval")]
    assert row["backbone"] == "tiny" and row["size"] == 64 and row["images"] == 1
    assert all(s >= 0 for s in stages) and row["forward_s"] > 0
    assert row["total_s"] >= max(stages)
    if row["peaks_per_image"]:
        assert row["prm_s"] > 0 and row["prm_s_per_peak"] > 0


def test_stage_times_change_nothing_in_the_predictions() -> None:
    from ranprm.cli.build import build_module
    from ranprm.cli.config import compose

    module = build_module(compose("train", ["backbone=tiny"]), CLASSES).eval()
    images = torch.randn(2, 3, 64, 64)
    times: dict[str, float] = {}
    timed = module.predict_images(images, [(64, 64), (50, 70)], stage_times=times)
    plain = module.predict_images(images, [(64, 64), (50, 70)])
    assert set(times) == {"forward", "select", "prm", "retrieval"} and all(t >= 0 for t in times.values())
    for a, b in zip(timed, plain, strict=True):
        assert torch.equal(a.peaks, b.peaks) and torch.equal(a.instances.masks, b.instances.masks)


def test_variants_case_times_one_pass_against_separate_runs(voc_root, capsys) -> None:
    from ranprm.bench import variants

    variants.main(["--quick", *_data(voc_root)])
    (row,) = _rows(capsys)
    assert row["variants"] == 2 and row["images"] == 2 and row["size"] == 64
    assert row["one_pass_s"] > 0 and row["separate_s"] > 0 and row["single_after_s"] > 0
    assert row["speedup"] == pytest.approx(row["separate_s"] / row["one_pass_s"], rel=2e-2)
    assert set(row["predictions_per_variant"]) == {"seed/prm_only", "mean/prm_only"}
