"""Exclusive locks between fedpath processes: an output directory, a site's privacy ledger.

A hospital job scheduler (or an impatient user) may start ``prepare`` twice on one directory;
the second run would delete the first one's in-progress temporaries as stale and both would
race on the same outputs. The lock is the kernel's ``flock`` (through ``filelock``), released
when the process dies, so a killed run never leaves a lock behind that needs manual clean-up;
on a filesystem without ``flock`` it fails rather than fall back to a marker file that a
killed run would leave.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from fedpath.common.errors import FedpathError

LOCK_NAME = ".fedpath.lock"

__all__ = ["LOCK_NAME", "DirectoryLockedError", "exclusive_directory", "kernel_lock"]


class DirectoryLockedError(FedpathError):
    """Another process holds the directory's lock."""


def kernel_lock(
    path: Path,
    *,
    timeout: float,
    mode: int,
    on_acquired: Callable[[int], None] | None = None,
) -> FileLock:
    """A ``flock`` on ``path`` (created with ``mode``), waiting up to ``timeout`` s (0: fail
    at once); acquiring it raises :class:`filelock.Timeout` when another process holds it."""
    return FileLock(
        path, timeout=timeout, mode=mode, fallback_to_soft=False, on_acquired=on_acquired
    )


@contextlib.contextmanager
def exclusive_directory(directory: str | os.PathLike[str], purpose: str) -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on ``directory`` for the duration of the block.

    The lock file names its holder (pid and purpose) for whoever finds it in use.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)

    def name_the_holder(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {purpose}\n".encode())

    lock = kernel_lock(root / LOCK_NAME, timeout=0, mode=0o644, on_acquired=name_the_holder)
    try:
        lock.acquire()
    except Timeout:
        raise DirectoryLockedError(
            f"{root} is in use by another fedpath process ({purpose}); wait for it to "
            "finish or stop it, then run again"
        ) from None
    try:
        yield root
    finally:
        lock.release()
