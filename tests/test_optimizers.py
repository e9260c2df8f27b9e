"""The optimizer group: optimizers, the backbone lr multiplier and the cosine schedule."""

import math
from types import SimpleNamespace

import pytest
import torch

from ranprm.errors import ConfigError
from ranprm.lightning.module import PRMModule
from tests.helpers import CLASSES, HEAD


def _configured(optimizer: dict, steps: int = 10):
    module = PRMModule(list(CLASSES), {"name": "tiny", "width": 4}, HEAD, optimizer)
    module.trainer = SimpleNamespace(estimated_stepping_batches=steps)
    return module.configure_optimizers()


def test_cosine_schedule_decays_every_group_to_zero_at_the_last_step():
    config = _configured({"name": "adam", "lr": 1e-3, "backbone_lr_mult": 0.1, "scheduler": "cosine"}, steps=10)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-3])
    lrs = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[1]["lr"])
    assert lrs[4] == pytest.approx(0.5e-3)  # half-way down the cosine
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_no_scheduler_returns_the_bare_optimizer():
    optimizer = _configured({"name": "sgd", "lr": 0.01, "momentum": 0.9, "scheduler": "none"})
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize(
    ("optimizer", "option"),
    [
        ({"name": "lbfgs", "lr": 1.0}, "optimizer.name"),
        ({"name": "adam", "lr": 1e-3, "scheduler": "step"}, "optimizer.scheduler"),
    ],
)
def test_unknown_optimizer_or_scheduler_is_a_config_error(optimizer, option):
    with pytest.raises(ConfigError, match=option):
        _configured(optimizer)


def test_the_cosine_retargeted_to_a_longer_run_is_that_runs_cosine_from_the_resumed_step_down_to_zero():
    """Resuming with a larger trainer.max_epochs: from the resumed step on, the lr of a run planned that long, down
    to 0 at its end (torch's CosineAnnealingLR past its T_max climbed back to the peak)."""
    config = _configured({"name": "sgd", "lr": 1.0, "scheduler": "cosine"}, steps=10)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)  # (1 + cos(pi * 5 / 10)) / 2
    state = scheduler.state_dict()
    resumed = _configured({"name": "sgd", "lr": 1.0, "scheduler": "cosine"}, steps=20)
    new_optimizer, new_scheduler = resumed["optimizer"], resumed["lr_scheduler"]["scheduler"]
    new_optimizer.load_state_dict(optimizer.state_dict())
    new_scheduler.load_state_dict(state)  # as Lightning restores it: the saved length (10) comes back
    assert new_scheduler.total_steps == 10 and new_scheduler.retarget(20)
    assert new_optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 20)))
    lrs = []
    for _ in range(15):
        new_optimizer.step()
        new_scheduler.step()
        lrs.append(new_optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 20)) for s in range(6, 21)], abs=1e-12)
    assert not new_scheduler.retarget(20)  # the same length: nothing changes (an exact resume stays exact)
    with pytest.raises(ValueError, match="step 20 is already done"):
        new_scheduler.retarget(19)


def test_a_checkpoint_of_torchs_cosine_resumes_on_the_same_curve():
    config = _configured({"name": "sgd", "lr": 1.0, "scheduler": "cosine"}, steps=10)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    groups = [{"params": [torch.zeros(1)]} for _ in optimizer.param_groups]
    legacy = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD(groups, lr=1.0), T_max=10)
    for _ in range(4):
        legacy.optimizer.step()
        legacy.step()
    scheduler.load_state_dict(legacy.state_dict())
    assert (scheduler.total_steps, scheduler.last_epoch) == (10, 4)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)  # step 5 of 10
