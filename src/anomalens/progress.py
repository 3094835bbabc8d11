"""Progress bars (rich) for every step that takes more than a second.

Bars are shown when the CLI turns them on (`enable`) or when standard error is a terminal; the
library stays quiet inside tests, services and notebooks that don't ask for them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

T = TypeVar("T")
_forced: bool | None = None


def enable(on: bool = True) -> None:
    """Force progress bars on (or off) regardless of whether stderr is a terminal."""
    global _forced
    _forced = on


def enabled() -> bool:
    return _forced if _forced is not None else sys.stderr.isatty()


class _Progress(Progress):
    """A rich Progress that registers itself so that bars opened inside it nest as extra rows."""

    def __enter__(self) -> _Progress:
        _active.append(self)
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        _active.remove(self)
        super().__exit__(*exc)


class _Nested:
    """Adds rows to the progress display already on screen, and removes them when done."""

    def __init__(self, outer: Progress) -> None:
        self._outer = outer
        self._tasks: list[TaskID] = []

    def __enter__(self) -> _Nested:
        return self

    def __exit__(self, *exc: object) -> None:
        for task in self._tasks:
            self._outer.remove_task(task)

    def add_task(self, description: str, **kwargs: Any) -> TaskID:
        task = self._outer.add_task(description, **kwargs)
        self._tasks.append(task)
        return task

    def __getattr__(self, name: str) -> Any:
        return getattr(self._outer, name)


class RateColumn(ProgressColumn):
    """Items per second, for bars whose task names its `unit` (such as `img`)."""

    def render(self, task: Any) -> Text:
        unit = task.fields.get("unit")
        if not unit or not task.speed:
            return Text("")
        return Text(f"{task.speed:.1f} {unit}/s")


_active: list[_Progress] = []


def make_progress() -> Progress:
    """A progress display with a bar, counts, elapsed and remaining time; inside another one it
    adds rows to it (rich allows one live display at a time)."""
    if _active:
        return _Nested(_active[-1])  # type: ignore[return-value]
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        RateColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled(),
    )


def track(
    items: Iterable[T], description: str, total: int | None = None, unit: str | None = None
) -> Iterator[T]:
    """Iterate over `items` with a progress bar; `total` defaults to len(items); `unit` (such as
    `img`) shows the rate."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress() as progress:
        task = progress.add_task(description, total=total, info="", unit=unit)
        for item in items:
            yield item
            progress.advance(task)
