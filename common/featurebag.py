"""The feature-bag file format (DESIGN §3) shared by preparation, training and the server check.

A bag is one slide: ``features`` (N×D), ``coords`` (N×2 level-0 top-left x,y, same order),
optionally ``patch_labels`` (N int8: 1 tumour, 0 normal, −1 unknown) and ``tumour_fraction``
(N float32), plus provenance attributes. Writing is streamed (a slide's features never need to
be in memory at once) into a temporary file that is renamed into place only when complete.
Plain CLAM/TRIDENT files (``features`` + ``coords`` only) are readable too.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fedpath.common import __version__
from fedpath.common.atomic import OutputWriteError, atomic_path
from fedpath.common.errors import FeatureBagError

REQUIRED_ATTRS: tuple[str, ...] = (
    "encoder",
    "encoder_sha256",
    "feature_dim",
    "patch_size_px",
    "target_mpp",
    "slide_id",
    "fedpath_version",
    "config_sha256",
)
"""Attributes every fedpath-written bag carries (CLAM/TRIDENT files may lack them)."""

LABEL_TUMOUR, LABEL_NORMAL, LABEL_UNKNOWN = 1, 0, -1


@dataclass(frozen=True)
class FeatureBag:
    """One slide's features, loaded into memory."""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    patch_labels: np.ndarray | None = None
    tumour_fraction: np.ndarray | None = None

    @property
    def num_patches(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])


def plain_value(value: Any) -> Any:
    """h5py returns bytes / numpy scalars; normalise to plain Python for comparisons and JSON."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def read_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read only a bag's attributes (cheap: used by resume checks and harmonisation)."""
    try:
        with h5py.File(path, "r") as fh:
            return {k: plain_value(v) for k, v in fh.attrs.items()}
    except (OSError, KeyError) as exc:
        raise FeatureBagError(str(path), f"cannot be read as HDF5 ({exc})") from exc


def read_feature_bag(path: str | os.PathLike[str], *, validate: bool = True) -> FeatureBag:
    """Load a bag, checking shapes and finiteness so bad files fail here, not mid-training."""
    try:
        with h5py.File(path, "r") as fh:
            if "features" not in fh or "coords" not in fh:
                raise FeatureBagError(str(path), "needs datasets 'features' and 'coords'")
            features = fh["features"][()]
            coords = fh["coords"][()]
            labels = fh["patch_labels"][()] if "patch_labels" in fh else None
            fraction = fh["tumour_fraction"][()] if "tumour_fraction" in fh else None
            attrs = {k: plain_value(v) for k, v in fh.attrs.items()}
    except FeatureBagError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise FeatureBagError(str(path), f"cannot be read as HDF5 ({exc})") from exc
    if features.ndim == 3 and features.shape[0] == 1:  # CLAM writes (1, N, D) in some versions
        features = features[0]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    bag = FeatureBag(features, coords, attrs, labels, fraction)
    if validate:
        validate_bag(bag, str(path))
    return bag


def validate_bag(bag: FeatureBag, where: str) -> None:
    """Raise ``FeatureBagError`` unless the arrays are consistent and finite."""
    if bag.features.ndim != 2:
        raise FeatureBagError(where, f"features must be N×D, got shape {bag.features.shape}")
    n = bag.features.shape[0]
    if bag.coords.shape != (n, 2):
        raise FeatureBagError(where, f"coords shape {bag.coords.shape} does not match N={n}")
    declared = bag.attrs.get("feature_dim")
    if declared is not None and int(declared) != bag.features.shape[1]:
        raise FeatureBagError(
            where, f"feature_dim attribute {declared} != stored width {bag.features.shape[1]}"
        )
    if not np.isfinite(bag.features).all():
        bad = int((~np.isfinite(bag.features)).any(axis=1).sum())
        raise FeatureBagError(where, f"{bad} patch(es) have NaN or Inf features")
    for name, arr in (("patch_labels", bag.patch_labels), ("tumour_fraction", bag.tumour_fraction)):
        if arr is not None and arr.shape != (n,):
            raise FeatureBagError(where, f"{name} shape {arr.shape} does not match N={n}")
    if bag.patch_labels is not None and not np.isin(bag.patch_labels, (-1, 0, 1)).all():
        raise FeatureBagError(where, "patch_labels must be -1, 0 or 1")


class _GuardedFile(io.RawIOBase):
    """The file object HDF5 writes through: a refused write is recorded, never raised into HDF5.

    libhdf5 does not survive a failing ``write(2)``: its metadata cache is left dirty, every
    later close retries the flush, h5py prints "Exception ignored" from ``__dealloc__`` and
    the interpreter can segfault at exit. Through this object HDF5 never sees an error: the
    first ``OSError`` (ENOSPC, EFBIG, EIO, ...) is kept in ``failure``, the bytes of that and
    every later write are kept in memory so that HDF5 reads back what it wrote and can close
    cleanly, and the caller raises one ``OutputWriteError`` and deletes the temporary.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDWR)
        self._pos = 0
        self._size = os.fstat(self._fd).st_size
        self._overlay: list[tuple[int, bytes]] = []
        self.failure: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def _record(self, error: OSError) -> None:
        if self.failure is None:
            self.failure = error

    def write(self, data: Any) -> int:  # type: ignore[override]
        chunk = bytes(data)
        if self.failure is None:
            try:
                done = 0
                while done < len(chunk):
                    done += os.pwrite(self._fd, chunk[done:], self._pos + done)
            except OSError as exc:
                self._record(exc)
        if self.failure is not None:
            self._overlay.append((self._pos, chunk))
        self._pos += len(chunk)
        self._size = max(self._size, self._pos)
        return len(chunk)

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        wanted = len(view)
        data = bytearray(wanted)
        try:
            got = os.pread(self._fd, wanted, self._pos)
            data[: len(got)] = got
        except OSError as exc:
            self._record(exc)
        for offset, chunk in self._overlay:  # bytes HDF5 wrote after the failure
            start, end = max(offset, self._pos), min(offset + len(chunk), self._pos + wanted)
            if start < end:
                data[start - self._pos : end - self._pos] = chunk[start - offset : end - offset]
        view[:] = data
        self._pos += wanted
        return wanted

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.failure is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as exc:
                self._record(exc)
        self._size = size
        return size

    def flush(self) -> None:
        """HDF5 flushes through ``write``; durability is ``sync``'s job."""

    def sync(self) -> None:
        if self.failure is None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._record(exc)

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            except OSError as exc:
                self._record(exc)
        super().close()


class AtomicH5File:
    """An HDF5 file written to a temporary and renamed into place, failing cleanly.

    ``with AtomicH5File(path) as out: out.file.create_dataset(...)``. A write the system
    refuses raises exactly one ``OutputWriteError`` naming ``path`` and the OS error (from
    ``check()`` as soon as it is noticed, or at the end of the block), after the HDF5 file is
    closed once and the temporary removed; libhdf5 never sees the failure (``_GuardedFile``).
    """

    CHUNK_CACHE_BYTES = 16 * 1024 * 1024
    """Raw-data chunk cache: a 256-row chunk of 1,280-d float32 (1.3 MB) stays cached while it
    is filled batch by batch, instead of being read back and rewritten for every batch."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stack: contextlib.ExitStack | None = None
        self._guard: _GuardedFile | None = None
        self._file: h5py.File | None = None

    @property
    def file(self) -> h5py.File:
        if self._file is None:
            raise RuntimeError("AtomicH5File.file used outside its context")
        return self._file

    def check(self) -> None:
        """Raise ``OutputWriteError`` if a write has already been refused."""
        if self._guard is not None and self._guard.failure is not None:
            raise OutputWriteError(self.path, self._guard.failure)

    def __enter__(self) -> AtomicH5File:
        stack = contextlib.ExitStack()
        try:
            tmp = stack.enter_context(atomic_path(self.path))
            try:
                self._guard = _GuardedFile(tmp)
            except OSError as exc:
                raise OutputWriteError(self.path, exc) from exc
            self._file = h5py.File(self._guard, "w", rdcc_nbytes=self.CHUNK_CACHE_BYTES)
        except BaseException:
            self._release()
            stack.__exit__(*sys.exc_info())
            raise
        self._stack = stack
        return self

    def _release(self) -> None:
        """Close the HDF5 file, then the descriptor, each exactly once."""
        file, self._file = self._file, None
        guard = self._guard
        try:
            if file is not None:
                file.close()
        finally:
            if guard is not None:
                if file is not None:
                    guard.sync()
                guard.close()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        stack, self._stack = self._stack, None
        assert stack is not None
        try:
            self._release()
            if exc_type is None:
                self.check()
        except BaseException as error:
            stack.__exit__(type(error), error, error.__traceback__)
            raise
        stack.__exit__(exc_type, exc, tb)


class FeatureBagWriter:
    """Streams one slide's features into a temporary HDF5 file, then renames it into place.

    Use as a context manager; call :meth:`write` with consecutive row blocks. The file appears
    under its final name only if every one of the ``num_patches`` rows was written and the
    block exits without an exception.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        coords: np.ndarray,
        feature_dim: int,
        attrs: Mapping[str, Any],
        patch_labels: np.ndarray | None = None,
        tumour_fraction: np.ndarray | None = None,
        dtype: str = "float32",
    ) -> None:
        missing = [k for k in REQUIRED_ATTRS if k not in attrs and k != "fedpath_version"]
        if missing:
            raise ValueError(f"feature bag attributes missing: {missing}")
        self._path = Path(path)
        self._coords = np.asarray(coords, dtype=np.int64)
        self._n = int(self._coords.shape[0])
        self._dim = int(feature_dim)
        self._attrs = {"fedpath_version": __version__, **dict(attrs)}
        self._labels = patch_labels
        self._fraction = tumour_fraction
        self._dtype = np.dtype(dtype)
        self._written = 0
        self._out: AtomicH5File | None = None
        self._dataset: h5py.Dataset | None = None

    def __enter__(self) -> FeatureBagWriter:
        out = AtomicH5File(self._path).__enter__()
        try:
            self._dataset = self._create(out.file)
            out.check()
        except BaseException as error:
            self._dataset = None
            out.__exit__(type(error), error, error.__traceback__)
            raise
        self._out = out
        return self

    def _create(self, fh: h5py.File) -> h5py.Dataset:
        """Every dataset but the features' rows, and the attributes."""
        chunk_rows = max(1, min(self._n, 256))
        dataset = fh.create_dataset(
            "features",
            shape=(self._n, self._dim),
            dtype=self._dtype,
            chunks=(chunk_rows, self._dim) if self._n else None,
        )
        fh.create_dataset("coords", data=self._coords)
        if self._labels is not None:
            fh.create_dataset("patch_labels", data=np.asarray(self._labels, dtype=np.int8))
        if self._fraction is not None:
            fh.create_dataset("tumour_fraction", data=np.asarray(self._fraction, dtype=np.float32))
        for key, value in self._attrs.items():
            fh.attrs[key] = value
        return dataset

    def write(self, features: np.ndarray) -> None:
        """Append the next block of rows (B×D)."""
        if self._dataset is None:
            raise RuntimeError("FeatureBagWriter.write called outside its context")
        block = np.asarray(features)
        if block.ndim != 2 or block.shape[1] != self._dim:
            raise ValueError(f"expected a (B, {self._dim}) block, got {block.shape}")
        end = self._written + block.shape[0]
        if end > self._n:
            raise ValueError(f"{end} rows written but the bag has {self._n} patches")
        if not np.isfinite(block).all():
            raise FeatureBagError(str(self._path), "encoder produced NaN or Inf features")
        self._dataset[self._written : end] = block.astype(self._dtype, copy=False)
        self._written = end
        assert self._out is not None
        self._out.check()  # a full disk stops the slide now, not after hours of embedding

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._out is not None
        out, self._out, self._dataset = self._out, None, None
        if exc_type is None and self._written != self._n:
            err = FeatureBagError(
                str(self._path), f"only {self._written} of {self._n} rows were written"
            )
            out.__exit__(type(err), err, None)
            raise err
        out.__exit__(exc_type, exc, tb)


def iter_bag_paths(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Feature files of a directory in a stable order (slide id order)."""
    yield from sorted(Path(directory).glob("*.h5"))
