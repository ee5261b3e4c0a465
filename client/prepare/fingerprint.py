"""What identifies a slide file's content for resuming ``prepare``, cheaply.

A feature bag is reused only if the slide it was made from is still the same. Size and mtime
alone are kept by a restore from backup, ``touch -r``, ``cp -p`` and ``rsync -t``; so, as git
does, the fast path also compares the inode and the ctime (which no user-level tool can set
back), and when any of them differs the slide's sampled content hash
(``fedpath.common.hashing.sha256_sampled``, recorded in the bag) decides: equal means the file was
only copied, moved or touched and the bag is reused; different means it is prepared again.

A MIRAX slide (``.mrxs``) keeps its pixels in a folder of the same name next to it; every file
of that folder is part of the fingerprint. Other multi-file formats (Hamamatsu ``.vms``,
DICOM folders) are fingerprinted by the file the manifest names only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpath.common.hashing import SAMPLE_SCHEME, sha256_json, sha256_sampled

MULTI_FILE_SUFFIXES = (".mrxs",)
"""Formats whose pixel data live in a sibling folder named like the file without suffix."""


def slide_files(path: Path) -> list[Path]:
    """The file the manifest names, then (MIRAX) every file of its data folder, sorted."""
    files = [path]
    if path.suffix.lower() in MULTI_FILE_SUFFIXES:
        folder = path.with_suffix("")
        if folder.is_dir():
            files += sorted(p for p in folder.iterdir() if p.is_file())
    return files


@dataclass(frozen=True)
class SlideFingerprint:
    """The fast-path identity of a slide's files; the sampled hash is computed on demand."""

    path: Path
    files: tuple[Path, ...]
    stats: tuple[tuple[str, int, int, int, int], ...]
    """(name relative to the slide's folder, size, mtime_ns, ctime_ns, inode) per file."""

    @property
    def size(self) -> int:
        return sum(stat[1] for stat in self.stats)

    @property
    def stat_sha256(self) -> str:
        return sha256_json([list(stat) for stat in self.stats])

    def sample_sha256(self) -> str:
        """sha256 over every file's name and sampled hash (reads about 6 MiB per file)."""
        digest = hashlib.sha256(SAMPLE_SCHEME.encode())
        for (name, *_), file in zip(self.stats, self.files, strict=True):
            digest.update(f"{name}\n{sha256_sampled(file)}\n".encode())
        return digest.hexdigest()

    def attrs(self, sample_sha256: str) -> dict[str, Any]:
        """What a feature bag records about the slide it was made from."""
        return {
            "slide_bytes": self.size,
            "slide_files": len(self.files),
            "slide_stat_sha256": self.stat_sha256,
            "slide_sample_sha256": sample_sha256,
            "slide_sample_scheme": SAMPLE_SCHEME,
        }


def fingerprint(path: Path) -> SlideFingerprint:
    """Stat the slide's files (raises ``OSError`` when one is missing or unreadable)."""
    files = slide_files(path)
    stats = []
    for file in files:
        st = os.stat(file)
        name = os.path.relpath(file, path.parent)
        stats.append((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return SlideFingerprint(path=path, files=tuple(files), stats=tuple(stats))
