"""Training order and augmentation as pure functions of (seed, epoch, image), so that a resumed run sees exactly the
images and flips the uninterrupted run would have seen; and loader workers that survive SIGTERM.

Why: a resumed run starts with fresh random generators and fresh workers, so a plain `shuffle=True` loader (order
drawn from the global generator) and per-worker augmentation seeds give it other batches than the uninterrupted run,
and a checkpoint taken mid-epoch restarts the epoch from its first batch. Here:
- `EpochSampler` shuffles with `seed + epoch` (PyTorch's `DistributedSampler` rule, on one or many ranks) and yields
  `(index, sample_seed)` pairs; the dataset seeds each image's augmentation with `sample_seed`.
- `ResumableDataLoader` implements Lightning's stateful-loader interface (`state_dict` / `load_state_dict`, saved
  in every checkpoint): the epoch and the number of batches already trained, so a resumed epoch skips exactly those.
- `worker_init` makes loader workers ignore SIGTERM, SIGINT and SIGHUP: a scheduler (or Ctrl+C, or a closed
  terminal) signals the whole process group, and a worker that dies first takes the main process down with a
  traceback before it can save (issue 18). The main process still stops them. And on Linux a worker asks the
  kernel to kill it when the main process dies, however it dies (`die_with_parent`): a SIGKILLed or OOM-killed
  training left workers alive for hours, holding gigabytes (issue 27).
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

SampleKey = tuple[int, int]  # (dataset index, seed for that image's augmentation in this epoch)
_PRIME = 1_000_003
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of image `index` in `epoch`: the same whatever ran before (a resume, another worker)."""
    return ((int(seed) * _PRIME + int(epoch)) * _PRIME + int(index)) % (2**63)


class EpochSampler(DistributedSampler):
    """Shuffled indices as `(index, sample_seed)` pairs; order = permutation seeded by `seed + epoch`.

    A `DistributedSampler` (built with the trainer's world size and rank), so Lightning keeps it as it is under DDP.
    `skip`: the number of this rank's samples to drop at the start of the next iteration only (a resumed epoch).
    """

    def __init__(self, dataset: Dataset, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed), drop_last=False)
        self.skip = 0

    def resume_at(self, epoch: int, batches_done: int, batch_size: int) -> None:
        """Make the next iteration continue `epoch` after its first `batches_done` batches (or start the next
        epoch when that one was complete)."""
        if batches_done >= math.ceil(self.num_samples / batch_size):
            epoch, batches_done = epoch + 1, 0
        self.set_epoch(epoch)
        self.skip = batches_done * batch_size

    def __iter__(self) -> Iterator[SampleKey]:  # type: ignore[override]
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        for index in indices[skip:]:
            yield index, sample_seed(self.seed, self.epoch, index)


class ResumableDataLoader(DataLoader):
    """A DataLoader over an `EpochSampler` with Lightning's stateful-loader interface: its position is saved in each
    checkpoint and restored before the resumed run iterates it.

    `batches_done()` says how many batches of the current epoch have been trained when a checkpoint is saved (the
    loader itself cannot know: workers and Lightning fetch ahead); the datamodule reads it from the trainer. Lightning
    restores a loader's state only when it builds the loader after restoring the loops, which is not the case when
    `configure_optimizers` asks for `estimated_stepping_batches` (the cosine schedule does); so the datamodule also
    saves the position itself and hands it to the sampler when it builds the loader. Both paths set the same values.
    """

    def __init__(self, *args: Any, batches_done: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches_done = batches_done or (lambda: 0)

    def state_dict(self) -> dict[str, int]:
        # Lightning swaps in its own sampler for some modes (overfit_batches: a sequential one); then the order is
        # Lightning's, with no position of ours to save.
        if not isinstance(self.sampler, EpochSampler):
            return {}
        return {"epoch": int(self.sampler.epoch), "batches_done": int(self._batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not state or not isinstance(self.sampler, EpochSampler) or self.batch_size is None:
            return
        self.sampler.resume_at(int(state["epoch"]), int(state["batches_done"]), self.batch_size)


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (`prctl(PR_SET_PDEATHSIG)`); and if the
    parent is already gone, go now. A no-op elsewhere (macOS and Windows have no such call)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # a sandbox that forbids it: the worker behaves as before
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid != os.getppid():  # it died before the call above took effect
        os.kill(os.getpid(), signal.SIGKILL)


def worker_init(worker_id: int, chained: Callable[[int], None] | None = None) -> None:
    """Loader worker start-up: ignore the signals a scheduler, Ctrl+C or a closed terminal send the whole process
    group (the main process saves, then stops the workers), die with the main process (`die_with_parent`), then
    `chained` (Lightning's seeding worker init when `seed_everything(workers=True)` asked for it)."""
    for signum in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
        if signum is not None:
            signal.signal(signum, signal.SIG_IGN)
    die_with_parent()
    if chained is not None:
        chained(worker_id)
