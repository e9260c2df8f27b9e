"""End-to-end training on tiny data through the real config composition."""

import json
from pathlib import Path

import pytest
import torch

from ranprm.cli.config import compose, config_dir
from ranprm.train import train
from tests.coco_cases import write_coco
from tests.helpers import CLASSES


def _groups() -> dict[str, list[str]]:
    root = config_dir()
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in root.iterdir()
        if d.is_dir() and d.name not in ("hydra", "hparams_search", "experiment", "local")  # local: the user's own
    }


def _build_what_the_group_configures(group: str, cfg, run_dir: Path) -> None:
    """Build the object that the option of `group` in `cfg` configures, so a broken option fails here."""
    import lightning as L

    from ranprm.cli.build import build_callbacks, build_module
    from ranprm.cli.config import to_plain
    from ranprm.data.datamodule import DataConfig, VOCDataModule
    from ranprm.lightning.hardware import resolve_precision
    from ranprm.lightning.loggers import build_loggers, enabled_loggers
    from ranprm.models.prm_net import PRMNet
    from ranprm.prm.pipeline import InferenceConfig

    if group == "backbone":
        net = PRMNet.from_config(to_plain(cfg.backbone), num_classes=len(CLASSES)).eval()
        with torch.no_grad():
            crms = net(torch.zeros(1, 3, 64, 64))
        assert crms.shape[:2] == (1, len(CLASSES)) and crms.shape[2] >= 64 // net.stride
    elif group in ("threshold", "retrieval"):
        InferenceConfig.from_config(to_plain(cfg.threshold), to_plain(cfg.head), to_plain(cfg.prm),
                                    to_plain(cfg.retrieval))  # fmt: skip
    elif group == "optimizer":
        module = build_module(cfg, CLASSES)
        optimizer = module.build_optimizer()
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
            [cfg.optimizer.lr * cfg.optimizer.get("backbone_lr_mult", 1.0), cfg.optimizer.lr]
        )
    elif group == "logger":  # one option, one logger of its kind (none: none)
        names = enabled_loggers(to_plain(cfg.logger))
        loggers = build_loggers(to_plain(cfg.logger), run_dir)
        assert len(names) == len(loggers) <= 1
        assert all(name in type(lg).__name__.lower() for name, lg in zip(names, loggers, strict=True))
    elif group == "trainer":
        args = to_plain(cfg.trainer)
        if args.get("accelerator") == "gpu" and not torch.cuda.is_available():
            return  # needs a GPU; composing it is all a CPU machine can check
        if args.get("accelerator") == "mps" and not torch.backends.mps.is_available():
            return  # needs Apple silicon
        args["precision"] = resolve_precision(args.get("precision", "32-true"), args.get("accelerator", "auto"))
        L.Trainer(**args, logger=False, enable_checkpointing=False, default_root_dir=str(run_dir))
    elif group == "data":
        data = DataConfig.from_config(to_plain(cfg.data))
        if data.root is not None:
            VOCDataModule(data).setup("fit")
    elif group == "callbacks":
        assert build_callbacks(cfg, run_dir, has_logger=True)
    elif group == "paths":
        assert cfg.paths.output_dir == str(run_dir)
    elif group == "debug":  # a preset over the trainer, data and logger: each must still build
        args = to_plain(cfg.trainer)
        args["precision"] = resolve_precision(args.get("precision", "32-true"), args.get("accelerator", "auto"))
        L.Trainer(**args, logger=False, enable_checkpointing=False, default_root_dir=str(run_dir))
        assert cfg.data.num_workers == 0 and build_loggers(to_plain(cfg.logger), run_dir) != []
    else:
        raise AssertionError(f"config group {group!r} has no build check here; add one")


@pytest.mark.parametrize(
    "override", [f"{group}={option}" for group, options in _groups().items() for option in options]
)
def test_every_option_of_every_group_builds(override, tmp_path, voc_root):
    """Each option of each group composes and builds what it configures (a model, a rule, a logger, ...)."""
    extra = {
        "data=voc": [f"data.root={voc_root}", f"data.class_names=[{','.join(CLASSES)}]"],
        # the test's own tiny COCO-format set (tests/coco_cases.py), with its split names
        "data=coco": [f"data.root={write_coco(tmp_path / 'coco')}", "data.train_split=train", "data.val_split=val"],
    }.get(override, [])
    cfg = compose("train", [override, f"paths.output_dir={tmp_path}", *extra])
    _build_what_the_group_configures(override.split("=")[0], cfg, tmp_path)


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
    assert 0.0 < value <= 1.0  # 0 would mean the last validation epoch scored no image
    # the last epoch evaluates instances on every validation image (the class calibration's extra pass before it
    # once left that epoch with no batches)
    instance = summary["instance_metrics"]
    assert instance["num_images"] == 2 and {"map_r_50", "abo", "cls_map"} <= set(instance["metric_names"])
    assert summary["global_step"] == 4  # 6 train images, batch 4, 2 epochs
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    # No held-out split: validation is the evaluated split, so no checkpoint is selected on it.
    assert summary["best_checkpoint"] is None and summary["checkpoint_selection"]["selected"] == "last"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]


def test_a_best_checkpoint_is_selected_on_held_out_images_only(voc_root, tmp_path):
    overrides = tiny_overrides(voc_root, tmp_path) + ["data.holdout_fraction=0.34"]  # 2 of the 6 train images
    train(compose("train", overrides))
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert Path(summary["best_checkpoint"]).is_file() and Path(summary["best_checkpoint"]).name.startswith("best-")
    assert summary["checkpoint_selection"] == {"selected": "best", "monitor": "val/cls_map",
                                               "validation": "held-out 0.34 of Main/train"}  # fmt: skip


def test_last_checkpoint_holds_the_final_epoch_even_when_an_earlier_one_was_best(voc_root, tmp_path):
    """Lightning >= 2.5 refreshes `save_last` only when a top-k checkpoint is saved; ours must not go stale.

    mode=min on cls mAP makes an early epoch the 'best' one, so a stale last.ckpt would hold that epoch.
    """
    overrides = [o for o in tiny_overrides(voc_root, tmp_path) if not o.startswith("data.batch_size")] + [
        "data.batch_size=2",  # 4 training images after the hold-out: still 2 steps an epoch
        "data.holdout_fraction=0.34",  # a best checkpoint is selected on held-out images only
        "trainer.max_epochs=3",
        "callbacks.checkpoint.mode=min",
    ]
    train(compose("train", overrides))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 6)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["last_checkpoint"] == str(tmp_path / "checkpoints" / "last.ckpt")
