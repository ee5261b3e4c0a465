"""Atomic writes and content hashes."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from fedpath.common.atomic import (
    TMP_PREFIX,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temporaries,
)
from fedpath.common.hashing import sha256_file, sha256_json


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
    from fedpath.common.locking import LOCK_NAME, DirectoryLockedError, exclusive_directory

    with (
        exclusive_directory(tmp_path, "first"),
        pytest.raises(DirectoryLockedError, match="in use by another fedpath process"),
        exclusive_directory(tmp_path, "second"),
    ):
        pass
    with exclusive_directory(tmp_path, "third"):
        pass  # released when the first holder left
    # The lock file names its last holder for whoever finds the directory in use.
    assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()} third\n"


def test_sampled_hash_reads_the_edges_and_spread_blocks(tmp_path: Path) -> None:
    from fedpath.common.hashing import SAMPLE_BLOCK_BYTES, sample_ranges, sha256_sampled

    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    assert sample_ranges(1000) == [(0, 1000)]
    assert sha256_sampled(small) == hashlib.sha256(b"1000\n" + b"x" * 1000).hexdigest()

    size = 64 * 1024 * 1024
    ranges = sample_ranges(size)
    assert ranges[0] == (0, 1 << 20) and ranges[-1] == (size - (1 << 20), 1 << 20)
    assert all(offset >= 0 and offset + length <= size for offset, length in ranges)
    assert sum(length for _, length in ranges) == 2 * (1 << 20) + 64 * SAMPLE_BLOCK_BYTES
    big = tmp_path / "big.bin"
    with big.open("wb") as fh:
        fh.truncate(size)
    before = sha256_sampled(big)
    offset = ranges[30][0] + 10  # inside a sampled block in the middle of the file
    with big.open("r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x01")
    assert sha256_sampled(big) != before


def test_a_refused_write_names_the_final_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    from fedpath.common.atomic import OutputWriteError

    target = tmp_path / "out" / "site.json"
    target.mkdir(parents=True)  # a folder where the file must go: the rename is refused
    with pytest.raises(OutputWriteError) as caught:
        atomic_write_json(target, {"v": 1})
    assert str(caught.value) == f"cannot write {target}: Is a directory (EISDIR)"
    assert isinstance(caught.value, OSError) and caught.value.errno == 21
    assert not list(tmp_path.rglob(f"{TMP_PREFIX}*"))
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(OutputWriteError, match=r"cannot write .*file/x.json: Not a directory"):
        atomic_write_json(blocked / "x.json", {})


_FULL_DISK_SCRIPT = """
import resource, signal, sys
import numpy as np
from fedpath.common.atomic import OutputWriteError
from fedpath.common.featurebag import FeatureBagWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
attrs = dict(encoder="e", encoder_sha256="s", feature_dim=64, patch_size_px=256,
             target_mpp=0.5, slide_id="x", config_sha256="c")
try:
    with FeatureBagWriter(sys.argv[1], coords=np.zeros((2000, 2)), feature_dim=64,
                          attrs=attrs) as writer:
        for start in range(0, 2000, 100):
            writer.write(np.ones((100, 64), np.float32))
except OutputWriteError as error:
    print(error)
"""


@pytest.mark.parametrize("limit", [4096, 40_000, 200_000])
def test_hdf5_write_failure_is_one_error_not_a_crash(tmp_path: Path, limit: int) -> None:
    """A refused write inside libhdf5 used to print "Exception ignored" from h5py's
    ``__dealloc__`` and segfault at exit (at every one of these limits)."""
    import subprocess
    import sys

    target = tmp_path / "bag.h5"
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_SCRIPT, str(target), str(limit)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == f"cannot write {target}: File too large (EFBIG)\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_an_atomic_write_gets_the_mode_the_umask_gives(
    tmp_path: Path, umask: int, mode: int
) -> None:
    """mkstemp made every output 0600: a site prepared by an admin held a site.json and bags
    that the node's own user (deploy/fedpath-node.service: User=fedpath) could not read."""
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "site.json", {"a": 1})
        with atomic_path(tmp_path / "bag.h5") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "site.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "bag.h5").stat().st_mode) == mode
