"""An exclusive lock on an output directory, so two runs never write the same files.

A hospital job scheduler (or an impatient user) may start ``prepare`` twice on one directory;
the second run would delete the first one's in-progress temporaries as stale and both would
race on the same outputs. ``flock`` is released by the kernel when the process dies, so a
killed run never leaves a lock behind that needs manual clean-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from fedpath.common.errors import FedpathError

LOCK_NAME = ".fedpath.lock"


class DirectoryLockedError(FedpathError):
    """Another process holds the directory's lock."""


@contextlib.contextmanager
def exclusive_directory(directory: str | os.PathLike[str], purpose: str) -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on ``directory`` for the duration of the block."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryLockedError(
                f"{root} is in use by another fedpath process ({purpose}); wait for it to "
                "finish or stop it, then run again"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {purpose}\n".encode())
        yield root
    finally:
        os.close(fd)
