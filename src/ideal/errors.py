"""User-facing errors: one exception type whose message is the one line the CLI prints."""

from __future__ import annotations

from pathlib import Path


class IdealError(Exception):
    """An error caused by the user's input or environment (bad file, bad flag), not by a bug.

    The CLI prints `ideal: error: <message>` and exits non-zero without a traceback.
    """


def at(path: str | Path, line: int | None, reason: str) -> IdealError:
    """An error located in a file (and line, 1-based, when known): `path:line: reason`."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return IdealError(f"{where}: {reason}")
