"""Stop signals: SIGTERM (a scheduler's pre-emption, SLURM 30 s before its SIGKILL), SIGINT (Ctrl+C) and SIGHUP (a
closed terminal) ask a running command to stop at the next safe point, save what it can and exit non-zero with
a hint (128 + the signal's number, the shell's convention).

`stop_on_signals()` installs the handlers for a command's life; they only record the signal. Long loops call
`check_stop()` between images, and between chunks of peaks in peak backpropagation (a batch of PRMs at 448 px can
take minutes), which raises `StopRequested`; the Lightning shell (`ranprm.lightning.checkpoint.SaveOnStop`) saves a
checkpoint on it, and the entry points turn it into one line and the exit code (`ranprm.errors.RunInterrupted`).
A second Ctrl+C stops at once (KeyboardInterrupt) for a user who does not want to wait. Lightning's own SIGTERM
handler composes with this one (it calls the handler it found), so `trainer.received_sigterm` is set as before.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
_received: list[int] = []  # the signals received since the handlers were installed, first first


class StopRequested(BaseException):  # noqa: N818  (a request, not an error; a BaseException like KeyboardInterrupt
    # so that no `except Exception` on the way, e.g. a sweep's per-job failure record, mistakes it for a failure)
    """A stop signal arrived; raised at the next safe point by `check_stop`."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + int(signum)
        super().__init__(f"{self.signal_name} received")


def _record(signum: int, frame: Any) -> None:
    if _received and signum == getattr(signal, "SIGINT", None):
        raise KeyboardInterrupt  # Ctrl+C again: the user wants it stopped now
    _received.append(signum)


def received() -> int | None:
    """The first stop signal received (None if none)."""
    return _received[0] if _received else None


def check_stop() -> None:
    """Raise `StopRequested` if a stop signal arrived: call it between images in long loops."""
    if _received:
        raise StopRequested(_received[0])


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within, SIGTERM / SIGINT / SIGHUP are recorded for `check_stop` instead of killing the process; the previous
    handlers come back after. Nested uses and threads other than the main one install nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(STOP_SIGNALS[0]) is _record:
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    _received.clear()
    for signum in STOP_SIGNALS:
        signal.signal(signum, _record)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        _received.clear()
