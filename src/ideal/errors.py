"""User-facing errors: one exception type whose message is the one line the CLI prints."""

from __future__ import annotations

import errno
from pathlib import Path

#: OSError numbers caused by the user's environment, not by a bug: a full disk, a quota, a path
#: that may not be written. They end a command with one line instead of a traceback.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


class IdealError(Exception):
    """An error caused by the user's input or environment (bad file, bad flag), not by a bug.

    The CLI prints `ideal: error: <message>` and exits non-zero without a traceback.
    """


class WriteError(IdealError):
    """A file or directory could not be written (full disk, quota, permissions); nothing was."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: cannot write ({reason}); nothing was written")
        self.path, self.reason = Path(path), reason


def at(path: str | Path, line: int | None, reason: str) -> IdealError:
    """An error located in a file (and line, 1-based, when known): `path:line: reason`."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return IdealError(f"{where}: {reason}")


def environment_error(err: OSError) -> IdealError | None:
    """The one-line error for an OSError the environment caused (see ENVIRONMENT_ERRNOS), else None."""
    if err.errno not in ENVIRONMENT_ERRNOS:
        return None
    reason = err.strerror or str(err)
    return IdealError(f"{err.filename}: {reason}" if err.filename else reason)
