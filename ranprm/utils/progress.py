"""A progress bar with the time left over a plain loop, for work that runs outside a Lightning Trainer (the
Trainer brings its own bars: `ranprm.cli.build.progress_bar_callback`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

BARS = ("rich", "tqdm", "none")


def track(items: Iterable[T], total: int, description: str, bar: str = "tqdm", unit: str = "it") -> Iterator[T]:
    """`items` as they come, drawing `bar` (tqdm or rich, both show the ETA; none draws nothing) on stderr;
    `unit` names what an item is (tqdm's rate)."""
    if bar == "none":
        yield from items
    elif bar == "rich":
        from rich.console import Console
        from rich.progress import track as rich_track

        yield from rich_track(items, description=description, total=total, console=Console(stderr=True))
    elif bar == "tqdm":
        from tqdm import tqdm

        yield from tqdm(items, desc=description, total=total, unit=unit)
    else:
        raise ValueError(f"bar={bar!r}: choose one of {', '.join(BARS)}")
