"""Atomic file writes: a reader (or a resumed job) never sees a half-written file.

Every artefact is written to a hidden temporary file in the destination directory and renamed
into place only once it is complete; ``os.replace`` is atomic on POSIX within one filesystem.
On any exception the temporary file is removed, so an interrupted or failed job leaves nothing
behind that could later be mistaken for a finished output.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".fedpath-tmp-"


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it to ``final`` if the block succeeds."""
    final_path = Path(final)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=TMP_PREFIX, suffix=final_path.suffix, dir=final_path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``final`` atomically, flushed to disk before the rename."""
    with atomic_path(final) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


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
            path.unlink()
            removed.append(path)
    return removed
