"""Atomic writes and content hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from common.atomic import (
    TMP_PREFIX,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temporaries,
)
from common.hashing import sha256_file, sha256_json


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_failure_keeps_previous_version_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_stale_temporaries_removed(tmp_path: Path) -> None:
    (tmp_path / "deep").mkdir()
    stale = tmp_path / "deep" / f"{TMP_PREFIX}abc.h5"
    stale.write_text("x")
    keep = tmp_path / "deep" / "real.h5"
    keep.write_text("y")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert keep.exists() and not stale.exists()


def test_hashes(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_json({"b": 1, "a": [1, 2]}) == sha256_json({"a": [1, 2], "b": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})


def test_directory_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    from common.locking import DirectoryLockedError, exclusive_directory

    with (
        exclusive_directory(tmp_path, "first"),
        pytest.raises(DirectoryLockedError, match="in use by another fedpath process"),
        exclusive_directory(tmp_path, "second"),
    ):
        pass
    with exclusive_directory(tmp_path, "third"):
        pass  # released when the first holder left
