"""Atomic file writes: a reader (or a resumed job) never sees a half-written file.

Every artefact is written to a hidden temporary file in the destination directory and renamed
into place only once it is complete; ``os.replace`` is atomic on POSIX within one filesystem.
On any exception the temporary file is removed, so an interrupted or failed job leaves nothing
behind that could later be mistaken for a finished output.

A write that the operating system refuses (disk full, file too large, permission denied, a
read-only mount) becomes one ``OutputWriteError`` naming the *final* file and the OS error, so
the operator reads ``cannot write /data/x.h5: No space left on device (ENOSPC)`` once, not a
traceback about a temporary name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedpath.common.errors import FedpathError

TMP_PREFIX = ".fedpath-tmp-"

_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)")
"""HDF5 reports the failing system call as ``errno = 27, error message = '...'`` in its text."""


def os_error_text(error: BaseException) -> str:
    """``File too large (EFBIG)`` for an OSError, or an HDF5 error that carries an errno."""
    code = getattr(error, "errno", None)
    if not isinstance(code, int):
        found = _ERRNO_IN_TEXT.search(str(error))
        code = int(found.group(1)) if found else None
    if isinstance(code, int) and code > 0:
        name = errno.errorcode.get(code)
        return os.strerror(code) + (f" ({name})" if name else "")
    return str(error) or type(error).__name__


class OutputWriteError(FedpathError, OSError):
    """An output file could not be written; names the file and the operating system's reason.

    Also an ``OSError``, so code that already handles failed writes as such keeps working.
    """

    def __init__(self, path: str | os.PathLike[str], error: BaseException) -> None:
        self.path = str(path)
        self.reason = os_error_text(error)
        super().__init__(f"cannot write {self.path}: {self.reason}")
        code = getattr(error, "errno", None)
        self.errno = code if isinstance(code, int) else None

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"


def _remove_quietly(path: Path) -> None:
    """Remove a temporary; on a read-only or vanished directory there is nothing more to do."""
    with contextlib.suppress(OSError):
        path.unlink()


def _create_temporary(final_path: Path, mode: int) -> Path:
    """An empty, new temporary beside ``final_path``, created with ``mode`` less the umask.

    ``tempfile.mkstemp`` makes files 0600 whatever the umask: a site prepared by an admin
    then held a ``site.json`` and feature bags that the node's own user could not read.
    Files holding secrets pass 0600, so they are never readable by others, not even empty.
    """
    for _ in range(100):
        candidate = final_path.parent / f"{TMP_PREFIX}{secrets.token_hex(6)}{final_path.suffix}"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(final_path.parent))


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it to ``final`` if the block succeeds.

    Creating the folder or the temporary, and the final rename, raise ``OutputWriteError``;
    an exception of the block itself is re-raised as it is, after the temporary is removed.
    """
    final_path = Path(final)
    try:
        try:
            final_path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file stands where a folder of the path must be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
        tmp = _create_temporary(final_path, mode)
    except OSError as exc:
        raise OutputWriteError(final_path, exc) from exc
    try:
        yield tmp
        try:
            os.replace(tmp, final_path)
        except OSError as exc:
            raise OutputWriteError(final_path, exc) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``final`` atomically, flushed to disk before the rename."""
    with atomic_path(final) as tmp:
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise OutputWriteError(final, exc) from exc


def atomic_write_text(final: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``final`` atomically."""
    atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_json(final: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (stable diffs, stable hashes)."""
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete temporaries left by a process that was killed mid-write; return what was removed."""
    removed: list[Path] = []
    root = Path(directory)
    if not root.is_dir():
        return removed
    for path in root.rglob(f"{TMP_PREFIX}*"):
        if path.is_file():
            try:
                path.unlink()
            except OSError as exc:
                raise OutputWriteError(path, exc) from exc
            removed.append(path)
    return removed
