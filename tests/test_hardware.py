"""Precision and memory-format choices: `trainer.precision=auto`, bf16-mixed training, channels_last."""

import json

import pytest
import torch

from ranprm.cli.config import compose
from ranprm.lightning import hardware
from ranprm.lightning.module import PRMModule
from ranprm.train import train
from tests.helpers import CLASSES, HEAD
from tests.test_train import tiny_overrides


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed", "16-mixed", 32])
def test_explicit_precision_is_passed_through(explicit):
    assert hardware.resolve_precision(explicit, "auto") == explicit


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_precision_follows_native_bf16(monkeypatch, native, expected):
    seen = []
    monkeypatch.setattr(hardware, "native_bf16", lambda device: seen.append(device) or native)
    assert hardware.resolve_precision("auto", "cpu") == expected
    assert seen == ["cpu"]


def test_auto_precision_on_other_accelerators_is_fp32():
    assert hardware.resolve_precision("auto", "mps") == "32-true"


def test_training_device_type():
    assert hardware.training_device_type("gpu") == "cuda"
    assert hardware.training_device_type("cpu") == "cpu"
    assert hardware.training_device_type("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bf16_mixed_channels_last_training_runs_instance_eval(voc_root, tmp_path):
    """bf16 autocast in validation must not reach PRM's custom backward (it runs in fp32): instance metrics appear."""
    overrides = tiny_overrides(voc_root, tmp_path) + ["trainer.precision=bf16-mixed", "channels_last=true"]
    value = train(compose("train", overrides))
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= value <= 1.0
    assert summary["instance_metrics"]["num_images"] > 0
    assert "val/map_r_50" in summary["metrics"]


def test_channels_last_changes_layout_not_results():
    backbone = {"name": "tiny", "width": 8}
    optimizer = {"name": "sgd", "lr": 0.01}
    torch.manual_seed(0)
    plain = PRMModule(list(CLASSES), backbone, HEAD, optimizer, channels_last=False).eval()
    nhwc = PRMModule(list(CLASSES), backbone, HEAD, optimizer, channels_last=True).eval()
    nhwc.load_state_dict(plain.state_dict())
    conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(images), plain(images), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_network_gives_the_eager_results_and_plain_checkpoint_keys():
    backbone = {"name": "tiny", "width": 8}
    optimizer = {"name": "sgd", "lr": 0.01}
    torch.manual_seed(0)
    eager = PRMModule(list(CLASSES), backbone, HEAD, optimizer).eval()
    compiled = PRMModule(list(CLASSES), backbone, HEAD, optimizer, compile=True).eval()
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no `_orig_mod.` copies
    compiled.load_state_dict(eager.state_dict())
    images = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), eager(images), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_true_trains_and_its_checkpoint_predicts(voc_root, tmp_path):
    from ranprm.lightning.checkpoint import load_module

    train(compose("train", tiny_overrides(voc_root, tmp_path) + ["compile=true", "trainer.max_epochs=1"]))
    module = load_module(tmp_path / "checkpoints" / "last.ckpt")
    assert module.hparams.compile is False  # inference runs the eager network
    (prediction,) = module.predict_images(torch.randn(1, 3, 64, 64), [(64, 64)])
    assert prediction.crms.shape[0] == len(CLASSES)
