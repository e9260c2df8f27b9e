"""Shared test set-up: W&B off, few threads (CI has 2 cores), and every test starting from the same global state.

Threads: the usable cores shared among pytest-xdist's workers (`make test` runs one per core), at most 2 per process.
Two processes whose torch thread pools together exceed the cores wait on each other at every op (a 30-step training
of the tiny RAN took 0.08 s a step alone and 13 s beside another two-thread process on 2 cores), so never more.

Each test starts with every random generator seeded (torch, NumPy's legacy global, Python's `random`) and the
torch settings a test or the code under test may change (threads, default dtype, grad mode, matmul precision) put
back afterwards: no outcome may depend on which tests ran before.
"""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ranprm.data.datamodule import usable_cores  # noqa: E402

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
TEST_THREADS = max(1, min(2, usable_cores() // WORKERS))
torch.set_num_threads(TEST_THREADS)
os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)  # the commands tests start, too


@pytest.fixture(autouse=True, scope="session")
def _run_folders_out_of_the_repository(tmp_path_factory):
    """A command a test starts without naming its run folder writes under $RANPRM_LOG_DIR (conf/paths), here a
    scratch folder, never into the checkout's outputs/ or multirun/."""
    previous = os.environ.get("RANPRM_LOG_DIR")
    os.environ["RANPRM_LOG_DIR"] = str(tmp_path_factory.mktemp("runs"))
    yield
    if previous is None:
        os.environ.pop("RANPRM_LOG_DIR", None)
    else:
        os.environ["RANPRM_LOG_DIR"] = previous


@pytest.fixture(autouse=True)
def _same_global_state_for_every_test():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    torch.set_num_threads(TEST_THREADS)
    dtype, grad, precision = torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_float32_matmul_precision()
    yield
    torch.set_num_threads(TEST_THREADS)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    torch.set_float32_matmul_precision(precision)


@pytest.fixture
def voc_root(tmp_path):
    """A tiny VOC 2012-layout folder (8 images, 64 px, classes square and disk) written by the test."""
    from tests.helpers import write_voc

    return write_voc(tmp_path / "VOC2012")
