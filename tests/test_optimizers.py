"""The optimizer group: optimizers, the backbone lr multiplier and the cosine schedule."""

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
