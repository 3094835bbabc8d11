"""Progress bars (rich) for every step that takes more than a second.

Bars are shown when the CLI turns them on (`enable`) or when standard error is a terminal; the
library stays quiet inside tests, services and notebooks that don't ask for them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
_forced: bool | None = None


def enable(on: bool = True) -> None:
    """Force progress bars on (or off) regardless of whether stderr is a terminal."""
    global _forced
    _forced = on


def enabled() -> bool:
    return _forced if _forced is not None else sys.stderr.isatty()


def make_progress() -> Progress:
    """A rich progress display with a bar, counts, elapsed and remaining time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=False,
        disable=not enabled(),
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items` with a progress bar; `total` defaults to len(items)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress() as progress:
        task = progress.add_task(description, total=total, info="")
        for item in items:
            yield item
            progress.advance(task)
