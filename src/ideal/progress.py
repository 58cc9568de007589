"""Progress bars: rich bars on an interactive terminal, one log line per stage otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")
log = logging.getLogger("ideal")


def track(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Iterate over `items` showing progress on stderr (only when stderr is a terminal)."""
    start = time.perf_counter()
    if sys.stderr.isatty():
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, transient=False) as bar:
            yield from bar.track(items, total=total, description=description)
    else:
        yield from items
    log.info("%s: %d steps in %.1f s", description, total, time.perf_counter() - start)


class StepBar:
    """A bar over optimizer steps with live metrics; off a terminal, a log line every ~10 %."""

    def __init__(self, total: int, description: str, start: int = 0):
        self.total, self.description, self.done = total, description, start
        self._every = max(1, total // 10)
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> StepBar:
        if sys.stderr.isatty():
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"),
                TimeRemainingColumn(),
            )
            self._bar = Progress(*columns)
            self._bar.__enter__()
            self._task = self._bar.add_task(
                self.description, total=self.total, completed=self.done, metrics=""
            )
        return self

    def update(self, step: int, **metrics: float) -> None:
        self.done = step
        text = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        if self._bar is not None:
            self._bar.update(self._task, completed=step, metrics=text)
        elif step % self._every == 0 or step == self.total:
            log.info("%s: step %d/%d  %s", self.description, step, self.total, text)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
