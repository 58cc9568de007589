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
