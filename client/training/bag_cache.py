"""A byte-capped LRU of feature bags read from disk, for the hospital's resident worker.

Within one run, a site reads the same bags again and again: every round's train message
loads the training and validation bags, and the evaluate message that follows reads the
validation bags once more. A fresh message process gains nothing from a cache (it reads each
bag once and exits), but the resident worker (:mod:`fedpath.client.worker`) lives through every
message of a run, so it keeps the validated bags of the run in memory up to a cap
(default 512 MiB; node config ``bag-cache-mib``, 0 turns it off).

A cached bag is never served stale: the key is the file's identity (resolved path, device,
inode, size, modification and change times in ns), taken before and after the read, and the
bag is cached only when both agree; a file that was rewritten (fedpath writes bags to a
temporary name and renames them, so a new file is a new inode) is a miss. What is cached is
the file's content; the checks against the caller's expectations (feature width, encoder
hash) run on every hit, exactly as on a read (:func:`fedpath.client.training.bags.load_bag`).

Cached tensors are shared between messages, so their consumers must treat them as read-only,
as the trainers and scorers do (they batch into new tensors or only run forward passes).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpath.common.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_CAP_BYTES",
    "NODE_CONFIG_KEY",
    "BagCache",
    "BagContent",
    "FileIdentity",
    "active_cache",
    "cap_from_node_config",
    "use_bag_cache",
]

NODE_CONFIG_KEY = "bag-cache-mib"
DEFAULT_CAP_BYTES = 512 * 2**20
"""Room for a run's validation set and a small site's training set; a site with bigger bags
simply reads the ones that do not fit, as without a cache."""


@dataclass(frozen=True)
class FileIdentity:
    """What tells one version of a file from another without reading it."""

    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        """The identity of the file ``path`` points at now; ``OSError`` if it is gone."""
        resolved = os.path.realpath(path)
        info = os.stat(resolved)
        return cls(
            resolved, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns
        )


@dataclass(frozen=True)
class BagContent:
    """A validated bag file's content as training uses it (independent of the index entry)."""

    features: torch.Tensor
    """``[N, D]`` float32."""
    patch_labels: torch.Tensor | None
    encoder_sha256: str | None
    """The encoder hash recorded in the file, if any."""

    @property
    def nbytes(self) -> int:
        labels = 0 if self.patch_labels is None else self.patch_labels.nbytes
        return int(self.features.nbytes) + int(labels)


class BagCache:
    """Least recently used bags, at most ``cap_bytes`` of tensor data, for one run at a time.

    ``begin`` is called once per message: a message of another run empties the cache (a run's
    bags are not kept for the next one, which may be hours later), and a smaller cap evicts at
    once.
    """

    def __init__(self, cap_bytes: int = DEFAULT_CAP_BYTES) -> None:
        self.cap_bytes = cap_bytes
        self.run_id: int | None = None
        self._entries: OrderedDict[FileIdentity, BagContent] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def begin(self, run_id: int, cap_bytes: int) -> None:
        """Scope the cache to ``run_id`` and apply the node's cap (a new run starts empty)."""
        if run_id != self.run_id:
            self.clear()
            self.run_id = run_id
        self.cap_bytes = cap_bytes
        self._evict_to(cap_bytes)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def get(self, identity: FileIdentity) -> BagContent | None:
        content = self._entries.get(identity)
        if content is None:
            self.misses += 1
            return None
        self._entries.move_to_end(identity)
        self.hits += 1
        return content

    def put(self, identity: FileIdentity, content: BagContent) -> None:
        """Keep ``content`` unless it alone exceeds the cap; evict the oldest to make room."""
        size = content.nbytes
        if size > self.cap_bytes:
            return
        old = self._entries.pop(identity, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._evict_to(self.cap_bytes - size)
        self._entries[identity] = content
        self.nbytes += size

    def _evict_to(self, budget: int) -> None:
        while self._entries and self.nbytes > budget:
            _, dropped = self._entries.popitem(last=False)
            self.nbytes -= dropped.nbytes
            self.evictions += 1


def cap_from_node_config(node_config: Mapping[str, Any]) -> int:
    """The cap in bytes from ``bag-cache-mib`` (a number >= 0; default 512); ConfigError."""
    raw = node_config.get(NODE_CONFIG_KEY)
    if raw is None or raw == "":
        return DEFAULT_CAP_BYTES
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise ConfigError(f"node config {NODE_CONFIG_KEY} must be a number of MiB, got {raw!r}")
    if raw < 0:
        raise ConfigError(f"node config {NODE_CONFIG_KEY} must be >= 0 (0: off), got {raw!r}")
    return int(raw * 2**20)


_active: ContextVar[BagCache | None] = ContextVar("fedpath_bag_cache", default=None)


def active_cache() -> BagCache | None:
    """The cache :func:`client.training.bags.load_bag` uses now (``None``: read every time)."""
    return _active.get()


@contextlib.contextmanager
def use_bag_cache(cache: BagCache | None) -> Iterator[None]:
    """Let the bag loaders use ``cache`` inside the block (the worker wraps each message)."""
    token = _active.set(cache)
    try:
        yield
    finally:
        _active.reset(token)
