"""Content hashes used for provenance and resumability.

Feature files record the sha256 of the encoder weights and of the preparation config, so a
server can refuse to mix incompatible features and a resumed ``prepare`` can tell whether an
existing output is still valid; and a sampled hash of the slide file, so a slide whose content
changed is not reused (``sha256_sampled``).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so large weight files stay out of memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of ``obj`` serialised canonically (sorted keys, no whitespace)."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return sha256_bytes(canonical.encode("utf-8"))


SAMPLE_EDGE_BYTES = 1 << 20
"""The first and last MiB of a sampled file are always hashed (TIFF headers, directories)."""
SAMPLE_BLOCK_BYTES = 64 << 10
SAMPLE_BLOCKS = 64
"""Evenly spaced 64 KiB blocks between the edges: about 6 MiB read per file, whatever its size."""
SAMPLE_SCHEME = "sha256(size, first/last 1 MiB, 64 evenly spaced 64 KiB blocks) v1"
"""Recorded next to every sampled hash, so a changed scheme is never compared as equal."""


def sample_ranges(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes ``sha256_sampled`` reads from a file of ``size`` bytes."""
    if size <= 2 * SAMPLE_EDGE_BYTES + SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
        return [(0, size)]
    span = size - 2 * SAMPLE_EDGE_BYTES - SAMPLE_BLOCK_BYTES
    middle = [
        (SAMPLE_EDGE_BYTES + i * span // (SAMPLE_BLOCKS - 1), SAMPLE_BLOCK_BYTES)
        for i in range(SAMPLE_BLOCKS)
    ]
    return [(0, SAMPLE_EDGE_BYTES), *middle, (size - SAMPLE_EDGE_BYTES, SAMPLE_EDGE_BYTES)]


def sha256_sampled(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's size and sampled blocks (the whole file when it is small).

    Cheap on a multi-GB slide (about 6 MiB read, a few dozen seeks) and sensitive to any
    re-scan, re-export or restore of another version, which change the header, the
    directories at the file's ends or the tiles everywhere. An in-place edit confined to bytes
    between the samples that also keeps the size is not seen (see README, re-preparation).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        digest.update(f"{size}\n".encode())
        for offset, length in sample_ranges(size):
            fh.seek(offset)
            remaining = length
            while remaining > 0:
                chunk = fh.read(min(remaining, _CHUNK))
                if not chunk:
                    break
                digest.update(chunk)
                remaining -= len(chunk)
    return digest.hexdigest()
