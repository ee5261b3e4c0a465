"""Patch readers that fill batch buffers: threads beside a CPU encoder, processes for a GPU.

On a CPU the encoder and the readers share the cores, so readers are a few low-priority threads
(see ``client.embed.extract``). A GPU encodes a batch in milliseconds and waits for the readers
instead: they then run in worker processes, one per core but one, each with its own slide
handle, writing 8-bit patches straight into shared-memory batch buffers, so the Python parts of
reading (tile lookup, bookkeeping) are not serialised by one interpreter's lock.

Torch-free on purpose: spawned reader processes import this module, not the encoder.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.shared_memory import SharedMemory

import cv2
import numpy as np

from fedpath.client.wsi.reader import WsiReader
from fedpath.client.wsi.resolution import ReadPlan
from fedpath.common.errors import FedpathError, SlideReadError


def resample_interpolation(read_size: int, input_size: int) -> int:
    """OpenCV interpolation for resizing a ``read_size`` patch to the encoder's input.

    Bilinear sampling only aliases once the scale drops below 1/2 (each output pixel then skips
    input pixels); between 1/2 and 1 it weights every input pixel, like the triangle filter of
    an antialiased resize, at less than half INTER_AREA's cost (0.19 vs 0.43 ms per 256→224
    patch here; features at cosine 0.9995 of INTER_AREA's on real H&E tiles). The reader
    shares two cores with the encoder, so this is what lifts the pipeline towards the model's
    own throughput. Stronger downscales keep INTER_AREA, the faithful box filter.
    """
    if read_size > 2 * input_size:
        return cv2.INTER_AREA
    return cv2.INTER_LINEAR


class Cancelled(Exception):
    """Raised inside a reader task once the pipeline is shutting down."""


class BatchFiller:
    """Reads one batch of 8-bit patches into a uint8 (B, S, S, 3) buffer."""

    def __init__(self, reader: WsiReader, plan: ReadPlan, input_size: int) -> None:
        self.reader = reader
        self.level = plan.level
        self.read = (plan.read_size, plan.read_size)
        self.size = input_size
        self.interpolation = resample_interpolation(plan.read_size, self.size)
        self.stop = threading.Event()

    def __call__(self, coords: np.ndarray, buffer: np.ndarray) -> int:
        for row, (x, y) in enumerate(coords.tolist()):
            if self.stop.is_set():
                raise Cancelled
            try:
                # A read-only view of a cached tile when the patch is one whole tile: the resize
                # below copies it into the batch anyway.
                rgb = self.reader.read_region((x, y), self.level, self.read, copy=False)
                if rgb.shape != (self.read[1], self.read[0], 3) or rgb.dtype != np.uint8:
                    raise ValueError(f"expected {self.read} uint8 RGB, got {rgb.shape} {rgb.dtype}")
                out = buffer[row]
                if self.read[0] == self.size:
                    out[...] = rgb
                else:
                    result = cv2.resize(
                        rgb, (self.size, self.size), dst=out, interpolation=self.interpolation
                    )
                    if not np.may_share_memory(result, out):
                        out[...] = result
            except FedpathError:
                raise
            except Exception as exc:
                raise SlideReadError(
                    self.reader.info.slide_id, f"patch at ({x}, {y}) level {self.level}: {exc}"
                ) from exc
        return len(coords)


# ------------------------------------------------------------------------ reader processes


@dataclass(frozen=True)
class ReaderJob:
    """What a reader process needs to fill batches of one slide (picklable)."""

    slide_path: str
    slide_id: str
    plan: ReadPlan
    input_size: int
    buffers: tuple[str, ...]
    batch: int


class _WorkerState:
    """A reader process's own slide handle and buffer views, set by its initializer.

    ``ProcessPoolExecutor`` hands tasks to long-lived workers; the slide is opened once per
    worker, not once per batch, so it must live between tasks in that process.
    """

    filler: BatchFiller | None = None
    error: str | None = None
    arrays: list[np.ndarray] = []  # noqa: RUF012 (a per-process holder, never shared)
    memory: list[SharedMemory] = []  # noqa: RUF012


def _start_worker(job: ReaderJob) -> None:
    """Open the slide and attach the buffers; a failure is kept and reported per task (an
    exception here would break the whole pool with no word on the slide)."""
    try:
        reader = WsiReader(job.slide_path, slide_id=job.slide_id)
    except FedpathError as exc:
        _WorkerState.error = f"a reader process cannot open the slide again: {exc}"
        return
    shape = (job.batch, job.input_size, job.input_size, 3)
    # The parent owns and unlinks the segments; spawned workers share its resource tracker,
    # whose record of each segment is a set entry, so attaching here adds nothing to clean.
    _WorkerState.memory = [SharedMemory(name=n) for n in job.buffers]
    _WorkerState.arrays = [np.ndarray(shape, np.uint8, buffer=m.buf) for m in _WorkerState.memory]
    _WorkerState.filler = BatchFiller(reader, job.plan, job.input_size)


def _fill_shared(index: int, coords: np.ndarray) -> tuple[int, str | None]:
    """Fill shared buffer ``index``; (rows, None), or (0, reason) when a patch cannot be read.

    The reason travels as text: ``SlideReadError`` takes two arguments and does not survive
    pickling back to the parent.
    """
    filler = _WorkerState.filler
    if filler is None:
        return 0, _WorkerState.error or "the reader process was not initialised"
    try:
        return filler(coords, _WorkerState.arrays[index]), None
    except SlideReadError as exc:
        return 0, exc.reason
    except Exception as exc:  # anything else in a worker is reported, not lost
        return 0, f"{type(exc).__name__}: {exc}"


class SharedBatches:
    """``count`` NHWC uint8 batch buffers in shared memory, unlinked on exit."""

    def __init__(self, count: int, batch: int, size: int) -> None:
        nbytes = batch * size * size * 3
        self.memory = [SharedMemory(create=True, size=nbytes) for _ in range(count)]
        self.arrays = [
            np.ndarray((batch, size, size, 3), np.uint8, buffer=m.buf) for m in self.memory
        ]

    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.memory)

    def close(self) -> None:
        self.arrays = []
        for memory in self.memory:
            with contextlib.suppress(BufferError, FileNotFoundError):
                memory.close()
                memory.unlink()


class ProcessReaders:
    """Reader processes for one slide: ``submit(index, coords)`` fills shared buffer ``index``."""

    def __init__(self, job: ReaderJob, workers: int) -> None:
        self.job = job
        self.pool: Executor = ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=_start_worker, initargs=(job,)
        )

    def submit(self, index: int, coords: np.ndarray) -> Future[tuple[int, str | None]]:
        return self.pool.submit(_fill_shared, index, coords)

    def rows(self, future: Future[tuple[int, str | None]]) -> int:
        rows, error = future.result()
        if error is not None:
            raise SlideReadError(self.job.slide_id, error)
        return rows

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def shared_batches(count: int, batch: int, size: int) -> Iterator[SharedBatches]:
    buffers = SharedBatches(count, batch, size)
    try:
        yield buffers
    finally:
        buffers.close()


def use_processes(mode: str, device_type: str, cores: int | None = None) -> bool:
    """Reader processes for ``mode`` "auto" only beside a GPU on a machine with ≥ 4 cores."""
    if mode != "auto":
        return mode == "processes"
    return device_type != "cpu" and (cores if cores is not None else os.cpu_count() or 1) >= 4
