"""Files we write: atomic writes (temporary file, then rename), atomic output directories, hashes.

Nothing is ever half-written: a crash leaves either the previous state or the complete new one. A
write the environment refuses (full disk, quota, permissions) is a `WriteError` naming the path, with
the temporary file or directory removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ideal.errors import ENVIRONMENT_ERRNOS, IdealError, WriteError, environment_error


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, then rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        _refused(path, err)
        raise
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            _refused(path, err)
        raise


def _refused(path: Path, err: OSError) -> None:
    """Raise a one-line WriteError for `path` if the environment refused the write (full disk,
    quota, permissions); return for any other OSError, which is a bug to see in full."""
    if err.errno in ENVIRONMENT_ERRNOS:
        raise WriteError(path, err.strerror or str(err)) from None


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise IdealError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise IdealError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise IdealError(f"{path}: not UTF-8 text") from None


def check_new_output_dir(out: str | Path) -> Path:
    """`out` must not exist, or be an empty directory: we never mix new results into old ones."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise IdealError(f"{out}: output directory exists and is not empty; choose another --out")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; rename it to `out` only on success.

    On any exception the temporary directory is removed and `out` is left as it was.
    """
    out = check_new_output_dir(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        _refused(out, err)
        raise
    try:
        yield tmp
        if out.exists():  # an empty directory (checked above): replace it
            out.rmdir()
        os.replace(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # name the file the user will look for, not the temporary directory that is gone
        if isinstance(err, WriteError) and err.path.is_relative_to(tmp):
            raise WriteError(out / err.path.relative_to(tmp), err.reason) from None
        if isinstance(err, OSError):
            where = Path(err.filename) if isinstance(err.filename, str) else tmp
            _refused(out / where.relative_to(tmp) if where.is_relative_to(tmp) else out, err)
        raise


@contextlib.contextmanager
def writing(path: Path, cleanup: Path) -> Iterator[None]:
    """Writes of torch and safetensors that a full disk or a denied path makes fail: one line
    (WriteError naming `path`) instead of a traceback, and `cleanup` (what was half written) gone.

    torch.save reports a full disk as a RuntimeError ("... file write failed") and safetensors as
    its own error ("... StorageFull ..."), neither an OSError with an errno, so the message is read.
    """
    try:
        yield
    except OSError as err:
        error = environment_error(err)
        if error is None:
            raise
        _remove(cleanup)
        raise WriteError(path, err.strerror or str(err)) from None
    except Exception as err:
        text = str(err)
        if not any(
            s in text for s in ("write failed", "StorageFull", "No space left", "os error 28")
        ):
            raise
        _remove(cleanup)
        raise WriteError(path, "the write failed: is the disk full?") from None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
