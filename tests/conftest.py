"""Shared test set-up: W&B off, few threads (CI has 2 cores), deterministic seeds."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def voc_root(tmp_path):
    """A tiny VOC 2012-layout folder (8 images, 64 px, classes square and disk) written by the test."""
    from tests.helpers import write_voc

    return write_voc(tmp_path / "VOC2012")
