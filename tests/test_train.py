"""End-to-end training on tiny data through the real config composition."""

import json
from pathlib import Path

import pytest
import torch

from ranprm.config import compose, config_dir
from ranprm.train import train
from tests.helpers import CLASSES


def _groups() -> dict[str, list[str]]:
    root = config_dir()
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in root.iterdir()
        if d.is_dir() and d.name not in ("hydra", "hparams_search", "experiment")
    }


@pytest.mark.parametrize(
    "override", [f"{group}={option}" for group, options in _groups().items() for option in options]
)
def test_every_config_composes(override, tmp_path):
    cfg = compose("train", [override, f"paths.output_dir={tmp_path}"])
    group = override.split("=")[0]
    assert cfg[group] is not None


def tiny_overrides(voc_root: Path, out: Path, backbone: str = "tiny") -> list[str]:
    return [
        f"backbone={backbone}",
        f"data.root={voc_root}",
        f"data.class_names=[{','.join(CLASSES)}]",
        "data.image_size=64",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer=cpu",
        "trainer.precision=32-true",  # auto would pick bf16 on some CI machines and fp32 on others
        "trainer.max_epochs=2",
        "logger=csv",
        "callbacks.progress_bar=none",
        f"paths.output_dir={out}",
    ]


@pytest.mark.parametrize("backbone", ["tiny", "resnet50"])
def test_short_training_run_writes_metrics_and_checkpoints(backbone, voc_root, tmp_path):
    cfg = compose("train", tiny_overrides(voc_root, tmp_path, backbone))
    value = train(cfg)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert value == summary["metrics"]["val/cls_map"]
    assert 0.0 <= value <= 1.0
    assert summary["global_step"] == 4  # 6 train images, batch 4, 2 epochs
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert Path(summary["best_checkpoint"]).is_file()


def test_last_checkpoint_holds_the_final_epoch_even_when_an_earlier_one_was_best(voc_root, tmp_path):
    """Lightning >= 2.5 refreshes `save_last` only when a top-k checkpoint is saved; ours must not go stale.

    mode=min on cls mAP makes an early epoch the 'best' one, so a stale last.ckpt would hold that epoch.
    """
    overrides = tiny_overrides(voc_root, tmp_path) + ["trainer.max_epochs=3", "callbacks.checkpoint.mode=min"]
    train(compose("train", overrides))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 6)  # 6 train images, batch 4: 2 steps an epoch
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["last_checkpoint"] == str(tmp_path / "checkpoints" / "last.ckpt")
