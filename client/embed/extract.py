"""Patch embedding: read → resize → encode (normalisation inside the encoder graph).

Embedding dominates a hospital's preparation time (DESIGN §4.2), so the model must never wait
for the disk and never run slower than it can:

- Reader threads decode patches and resize them as 8-bit RGB straight into preallocated NHWC
  uint8 batch buffers, which *are* channels_last (B, 3, S, S) tensors through
  ``torch.from_numpy(...).permute``: no copy between the reader and the model. At most
  ``queue_batches`` batches are in flight and the buffers are reused, so memory is flat
  whatever the slide size.
- Normalisation ((x/255 − mean)/std) runs inside the encoder's graph, on the encoder's intra-op
  threads, in float32 (see ``PixelEncoder``). Reading and inference share the same cores, so
  every reader cycle is taken from the encoder: doing it in the reader cost a float lookup table
  (0.20 ms per patch here) and a float resize four times the bytes of an 8-bit one (0.43 vs
  0.16 ms), about 6% of the encoder's own time per patch at ~150 patches/s.
- The main thread runs the encoder batch by batch in ``torch.inference_mode()`` and hands each
  (B, D) float32 block to the sink in coordinate order.
- By default the encoder is traced and frozen (TorchScript + oneDNN graph fusion: batch norm
  folded, conv+activation fused), about twice as fast as eager on CPU. The traced graph is
  checked against the eager model before use and built once per encoder/precision/batch size.
  Batches are always fed at the full batch size (the tail batch reuses stale rows, which are
  dropped) so the fused graph never re-specialises on a new shape.
- Reader threads run at low CPU priority (see ``_yield_to_inference``).
- ``choose_precision`` enables bfloat16 autocast only when the features stay within a cosine
  similarity threshold of float32 on a calibration batch. Measured on a 2-vCPU AVX512-BF16
  Xeon without AMX (bench/embedding.py), EfficientNet-Lite0, patches/s: eager float32 38 at
  batch 64 but 95 at batch 4; traced float32 71 at batch 64, 174 at batch 4; traced bf16 94 at
  batch 64, 141 at batch 8. Small batches (activations stay in cache) matter more than bf16,
  which only wins at large batches on such CPUs.

Errors in a reader thread (``SlideReadError``) surface in the caller at the batch they belong
to; all workers are then told to stop and joined, so nothing hangs and no thread outlives the
call.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from fedpath.client.config import EmbeddingConfig
from fedpath.client.embed.readers import (
    BatchFiller,
    ProcessReaders,
    ReaderJob,
    shared_batches,
    use_processes,
)
from fedpath.client.embed.registry import EncoderSpec, LoadedEncoder
from fedpath.client.threads import torch_threads
from fedpath.client.wsi.reader import WsiReader
from fedpath.client.wsi.resolution import ReadPlan
from fedpath.common.cpuinfo import read_cpuinfo

PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "float16")
CALIBRATION_PATCHES = 16
"""Patches in the bf16 calibration batch: enough for a stable mean cosine, cheap in float32."""
JIT_CHECK_ROWS = 2
"""Rows on which a traced graph is compared with the eager model before it is trusted."""
JIT_MIN_COSINE = {"float32": 0.9999, "bfloat16": 0.99, "float16": 0.99}
"""A traced graph that agrees less than this with eager is wrong (tracing bug), not noisy."""
ENGINE_MIN_COSINE = {"float32": 0.999, "bfloat16": 0.99}
"""Per-patch cosine to PyTorch float32 an exported engine's features must reach on real data."""
JIT_WARMUP_RUNS = 3
"""TorchScript profiles the first call(s) and fuses afterwards; warm up before timing/use."""
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""/proc/cpuinfo flags of native bf16 arithmetic (x86 AVX-512/AMX; ``bf16`` on aarch64)."""


@dataclass(frozen=True)
class ExtractionStats:
    """How one slide's embedding went (``mode``: "jit" for the traced graph, else "eager")."""

    num_patches: int
    seconds: float
    patches_per_second: float
    precision: str
    mode: str = "eager"


# --------------------------------------------------------------------------- inference runners


class PixelEncoder(torch.nn.Module):
    """The encoder fed 8-bit RGB: (B, 3, S, S) uint8 → normalise in float32 → features.

    Traced as one graph, so the uint8 → float conversion and the per-channel scale and offset
    run on the encoder's intra-op threads next to the stem convolution, instead of as a
    per-pixel pass in the reader threads that compete with it for the same cores. The
    arithmetic stays float32 under bfloat16 autocast (elementwise ops are not autocast ops).
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], spec: EncoderSpec) -> None:
        super().__init__()
        self.model = model
        scale, offset = _normalise_tensors(spec)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(torch.addcmul(self.offset, pixels.float(), self.scale))


class Runner:
    """A callable encoder at one precision: (B, 3, S, S) channels_last → (n, D) float32.

    The input is normalised float32, or uint8 RGB when the runner was built for pixels
    (``get_runner(..., pixels=True)``): then ``normalise`` holds the (scale, offset) applied
    here, unless ``module`` is a ``PixelEncoder`` graph that does it itself.
    With a static ``batch_size`` (traced graphs) inputs are always presented at that size;
    shorter inputs are zero-padded here and the extra rows dropped. ``autocast=False`` is for
    graphs traced under autocast: their casts are already explicit, and running them under
    autocast again would make TorchScript's autocast pass cast the float32 stem to bf16 too.
    """

    def __init__(
        self,
        module: Callable[[torch.Tensor], torch.Tensor],
        precision: str,
        mode: str,
        batch_size: int | None,
        *,
        autocast: bool = True,
        normalise: tuple[torch.Tensor, torch.Tensor] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.module = module
        self.device = device if device is not None else torch.device("cpu")
        self.precision = precision
        self.mode = mode
        self.batch_size = batch_size
        self.autocast = autocast
        self.normalise = (
            None
            if normalise is None
            else (normalise[0].to(self.device), normalise[1].to(self.device))
        )

    def __call__(self, batch: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Features of the first ``rows`` (default: all) rows of ``batch``."""
        n = batch.shape[0] if rows is None else rows
        if self.batch_size is None:
            return self._forward(batch[:n])[:n]
        if batch.shape[0] == self.batch_size:
            return self._forward(batch)[:n]
        chunks = []
        for start in range(0, n, self.batch_size):
            part = batch[start : min(n, start + self.batch_size)]
            padded = torch.zeros((self.batch_size, *batch.shape[1:]), dtype=batch.dtype).contiguous(
                memory_format=torch.channels_last
            )
            padded[: part.shape[0]] = part
            chunks.append(self._forward(padded)[: part.shape[0]])
        return torch.cat(chunks)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        # TorchScript may re-specialise a graph on any later call; with oneDNN fusion off at
        # that moment the new plan is unfused and stays slow (seen: 180 → 60 patches/s).
        on_cpu = self.device.type == "cpu"
        with (
            torch.inference_mode(),
            _autocast(self.precision if self.autocast else "float32", self.device.type),
            _onednn_fusion(self.mode == "jit"),
        ):
            if not on_cpu:
                # from pinned host memory (see _batch_buffers) the copy overlaps with compute
                batch = batch.to(self.device, non_blocking=True)
            if self.normalise is not None:
                scale, offset = self.normalise
                batch = torch.addcmul(offset, batch.float(), scale)
            out = self.module(batch).float()
            return out if on_cpu else out.cpu()


def _autocast(
    precision: str, device_type: str = "cpu"
) -> contextlib.AbstractContextManager[object]:
    if precision == "bfloat16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "float16":
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _onednn_fusion(enabled: bool) -> Iterator[None]:
    """oneDNN graph fusion is a process-wide TorchScript switch: scope it to our calls."""
    previous = torch.jit.onednn_fusion_enabled()
    with contextlib.suppress(RuntimeError):  # builds without oneDNN graph: plain TorchScript
        torch.jit.enable_onednn_fusion(enabled or previous)
    try:
        yield
    finally:
        with contextlib.suppress(RuntimeError):
            torch.jit.enable_onednn_fusion(previous)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity in float64 (the unit of every feature-faithfulness gate)."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1, eps=1e-12)


def planned_runner_key(precision: str) -> tuple[str, str]:
    """Where ``fedpath.client.embed.inference.plan_inference`` leaves the runner it chose."""
    return ("planned", precision)


def reader_threads_for(cfg: EmbeddingConfig, device: torch.device) -> int:
    """Reader threads: as configured on the CPU; on a GPU, every core but one unless set.

    A GPU encodes a batch in milliseconds, so reading (OpenSlide decoding and resizing, which
    release the GIL) becomes the bottleneck and should use the cores the encoder leaves free.
    """
    if device.type == "cpu" or "reader_threads" in cfg.model_fields_set:
        return cfg.reader_threads
    return max(cfg.reader_threads, (os.cpu_count() or 2) - 1)


def _normalise_tensors(spec: EncoderSpec) -> tuple[torch.Tensor, torch.Tensor]:
    scale, offset = _normalisation(spec)
    return torch.from_numpy(scale).view(1, 3, 1, 1), torch.from_numpy(offset).view(1, 3, 1, 1)


def _eager_runner(
    encoder: LoadedEncoder,
    precision: str,
    *,
    pixels: bool = False,
    device: torch.device | None = None,
) -> Runner:
    normalise = _normalise_tensors(encoder.spec) if pixels else None
    if device is not None and device.type != "cpu":
        encoder.model.to(device)
    return Runner(encoder.model, precision, "eager", None, normalise=normalise, device=device)


def _trace(
    encoder: LoadedEncoder, precision: str, example: torch.Tensor, *, pixels: bool
) -> torch.jit.ScriptModule:
    """Frozen TorchScript graph of the encoder for ``precision``.

    Python modules are traced under the autocast they will run with, so every cast is explicit
    in the graph, after folding BatchNorm in float32 (see ``fedpath.client.embed.models``); for
    ``pixels`` the traced module is the ``PixelEncoder`` around them. TorchScript checkpoints
    are frozen as they are (float32 folding), autocast applies when they run, and the runner
    normalises their input.
    """
    model = encoder.model
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream (torch.compile needs a C++ toolchain and ~40 s of
        # compilation here, and was slower); the warnings are not actionable for users.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if isinstance(model, torch.jit.ScriptModule):
            return torch.jit.freeze(model.eval())
        model = copy.deepcopy(model).eval()
        fold = getattr(model, "fold_batchnorm", None)
        if callable(fold):
            fold()
        if pixels:
            model = PixelEncoder(model, encoder.spec).eval()
        with torch.no_grad(), _autocast(precision):
            traced = torch.jit.trace(model, example, check_trace=False)
        return torch.jit.freeze(traced.eval())


def get_runner(
    encoder: LoadedEncoder,
    precision: str,
    batch_size: int,
    *,
    jit: bool,
    pixels: bool = False,
    device: torch.device | None = None,
) -> Runner:
    """The fastest faithful runner for ``encoder``, built once and cached on the encoder.

    ``pixels``: the runner takes uint8 RGB (what the pipeline feeds) and normalises it itself;
    otherwise it takes the normalised float batch the encoder's own model takes.
    A traced graph is warmed up on a calibration batch and compared with the eager model on its
    first rows; if tracing fails or disagrees, the eager model is used (same features, slower).
    On a GPU the eager model runs there under autocast (TorchScript's CPU fusion does not apply).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    on_gpu = device is not None and device.type != "cpu"
    jit = jit and not on_gpu
    key = (precision, batch_size if jit else None, jit, pixels, str(device or "cpu"))
    cached = encoder.runners.get(key)
    if cached is not None:
        return cached
    runner = _eager_runner(encoder, precision, pixels=pixels, device=device)
    if jit:
        images = calibration_images(encoder.spec, batch_size)
        example = images if pixels else normalise_images(encoder.spec, images)
        with _onednn_fusion(True):
            try:
                graph = _trace(encoder, precision, example, pixels=pixels)
                scripted = isinstance(encoder.model, torch.jit.ScriptModule)
                traced = Runner(
                    graph,
                    precision,
                    "jit",
                    batch_size,
                    autocast=scripted,
                    normalise=_normalise_tensors(encoder.spec) if pixels and scripted else None,
                )
                for _ in range(JIT_WARMUP_RUNS):
                    out = traced(example)
            except (RuntimeError, TypeError, ValueError, AttributeError):
                traced = None
        if traced is not None:
            rows = min(JIT_CHECK_ROWS, batch_size)
            reference = runner(example[:rows])
            if bool((cosines(out[:rows], reference) >= JIT_MIN_COSINE[precision]).all()):
                runner = traced
    encoder.runners[key] = runner
    return runner


# -------------------------------------------------------------------------- precision choice


def cpu_supports_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU has native bf16 arithmetic (else bf16 is emulated and slower)."""
    _, flags = read_cpuinfo(cpuinfo)
    if flags:
        return bool(flags & BF16_CPU_FLAGS)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def _synthetic_he_patch(rng: np.random.Generator, size: int) -> np.ndarray:
    """One H&E-like RGB uint8 patch: pink stroma, white gaps, purple elliptical nuclei."""
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = np.array([235, 160, 200]) + rng.integers(-25, 15, size=3)
    for _ in range(int(rng.integers(0, max(1, size // 64) + 1))):
        centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        radius = int(rng.integers(size // 16, size // 5 + 1))
        cv2.circle(canvas, centre, radius, (245.0, 240.0, 242.0), -1)
    long_axis, short_axis = max(3, size // 28), max(3, size // 40)
    for _ in range(int(rng.integers(10, 60)) * max(1, (size // 112) ** 2)):
        centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        axes = (int(rng.integers(2, long_axis)), int(rng.integers(2, short_axis)))
        colour = [float(c) for c in np.array([90, 60, 150]) + rng.integers(-30, 30, size=3)]
        cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    canvas = cv2.GaussianBlur(canvas, (0, 0), 1.0)
    canvas += rng.normal(0, 6, canvas.shape).astype(np.float32)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def calibration_images(spec: EncoderSpec, count: int, seed: int = 0) -> torch.Tensor:
    """Deterministic H&E-like uint8 RGB patches as a channels_last (B, 3, S, S) batch.

    Tissue-like colour statistics matter for the bf16 check: activations on uniform noise are
    not what the encoder will see on slides.
    """
    rng = np.random.default_rng(seed)
    images = np.stack([_synthetic_he_patch(rng, spec.input_size) for _ in range(count)])
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def normalise_images(spec: EncoderSpec, images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (B, 3, S, S) → the normalised float32 batch ``spec``'s model takes."""
    scale, offset = _normalise_tensors(spec)
    return torch.addcmul(offset, images.float(), scale)


def calibration_batch(spec: EncoderSpec, count: int, seed: int = 0) -> torch.Tensor:
    """``calibration_images`` normalised for ``spec`` (channels_last float32)."""
    return normalise_images(spec, calibration_images(spec, count, seed))


def measure_bf16_cosine(encoder: LoadedEncoder, cfg: EmbeddingConfig) -> tuple[float, float]:
    """(mean, min) per-patch cosine of bf16 features (run as the pipeline runs them) vs float32."""
    images = calibration_images(encoder.spec, CALIBRATION_PATCHES, seed=1)
    with torch_threads(cfg.torch_threads):
        reference = _eager_runner(encoder, "float32")(normalise_images(encoder.spec, images))
        runner = get_runner(encoder, "bfloat16", cfg.batch_size, jit=cfg.jit, pixels=True)
        candidate = runner(images)
    cos = cosines(candidate, reference)
    return float(cos.mean()), float(cos.min())


def choose_precision(encoder: LoadedEncoder, cfg: EmbeddingConfig) -> tuple[str, float | None]:
    """("float32" | "bfloat16", measured mean cosine or None when nothing was measured).

    "auto" picks bfloat16 only on CPUs with native bf16 and only when the calibration batch's
    mean cosine similarity to float32 reaches ``cfg.min_bf16_cosine``.
    """
    if cfg.precision != "auto":
        return cfg.precision, None
    if not cpu_supports_bf16():
        return "float32", None
    mean_cos, _ = measure_bf16_cosine(encoder, cfg)
    return ("bfloat16" if mean_cos >= cfg.min_bf16_cosine else "float32"), mean_cos


# ------------------------------------------------------------------------------ the pipeline


def _normalisation(spec: EncoderSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, offset) so that ``uint8 * scale + offset`` == (x/255 − mean)/std."""
    std = np.asarray(spec.std, dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)
    return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


READER_NICE = 19
"""Niceness of reader threads (Linux: per thread). See ``_yield_to_inference``."""


def _yield_to_inference() -> None:
    """Lower the calling reader thread's CPU priority so it never stalls the encoder.

    Intra-op parallel regions split work evenly over all cores and wait for the slowest
    thread: a reader taking a core from one OpenMP worker stalls the whole region (measured
    here: a busy Python thread next to a 2-thread forward pass made it 3.5× slower). At low
    priority readers mostly run in the encoder's idle gaps and, when the queue runs dry and
    the encoder waits, at full speed on every core: the total work is unchanged, fewer
    regions stall (+10-15% end-to-end on 2 vCPUs against equal-priority readers).
    """
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), READER_NICE)


RESAMPLING = "8-bit: linear up to 2x, area beyond; then normalised in float32"
"""Recorded in every feature file's config hash: changing the rule re-embeds resumed slides."""


def extract_features(
    reader: WsiReader,
    coords: np.ndarray,
    plan: ReadPlan,
    encoder: LoadedEncoder,
    cfg: EmbeddingConfig,
    sink: Callable[[np.ndarray], None],
    *,
    precision: str,
    progress: Callable[[int], None] | None = None,
) -> ExtractionStats:
    """Embed the patches at ``coords`` (N×2 level-0 top-left x, y) into ``sink``, in order.

    ``sink`` receives consecutive (≤ batch_size, D) float32 blocks; ``progress`` the number of
    patches of each finished batch. Raises ``SlideReadError`` when a patch cannot be read.
    The runner chosen by ``plan_inference`` for ``precision`` is used when there is one (device,
    engine, batch size); otherwise PyTorch on the CPU as configured.
    """
    start = time.perf_counter()
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be N×2, got shape {coords.shape}")
    coords = coords.astype(np.int64, copy=False)
    n = int(coords.shape[0])
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    with torch_threads(cfg.torch_threads), _onednn_fusion(cfg.jit):
        runner = encoder.runners.get(planned_runner_key(precision))
        if runner is None:
            runner = get_runner(encoder, precision, cfg.batch_size, jit=cfg.jit, pixels=True)
        if n:
            runner = _run_pipeline(reader, coords, plan, encoder, cfg, runner, sink, progress)
    seconds = time.perf_counter() - start
    return ExtractionStats(n, seconds, n / seconds if seconds > 0 else 0.0, precision, runner.mode)


def _checked_first_batch(
    encoder: LoadedEncoder, runner: Any, pixels: torch.Tensor, rows: int, features: torch.Tensor
) -> tuple[Any, torch.Tensor]:
    """An exported engine's first real batch, compared with PyTorch float32 before it is kept.

    The calibration batch is synthetic; a slide's own patches are the evidence that matters.
    On disagreement the encoder falls back to PyTorch for the rest of the process (and this
    batch is recomputed), so no feature below the gate is ever written.
    """
    reference = _eager_runner(encoder, "float32", pixels=True)(pixels, rows)
    worst = float(cosines(features, reference).min())
    runner.verified_on_slide = True
    if worst >= ENGINE_MIN_COSINE.get(runner.precision, ENGINE_MIN_COSINE["float32"]):
        return runner, features
    fallback = get_runner(encoder, runner.precision, int(pixels.shape[0]), jit=True, pixels=True)
    warnings.warn(
        f"{runner.mode} features reach cosine {worst:.5f} to PyTorch float32 on a slide's first "
        "batch; PyTorch encodes from here on",
        RuntimeWarning,
        stacklevel=2,
    )
    encoder.runners[planned_runner_key(runner.precision)] = fallback
    return fallback, fallback(pixels, rows)


def _batch_buffer(batch: int, size: int, device: torch.device) -> np.ndarray:
    """A reusable NHWC uint8 batch buffer; page-locked when batches go to a CUDA GPU."""
    if device.type == "cuda":
        return torch.zeros((batch, size, size, 3), dtype=torch.uint8).pin_memory().numpy()
    return np.zeros((batch, size, size, 3), dtype=np.uint8)


def _run_pipeline(
    reader: WsiReader,
    coords: np.ndarray,
    plan: ReadPlan,
    encoder: LoadedEncoder,
    cfg: EmbeddingConfig,
    runner: Any,
    sink: Callable[[np.ndarray], None],
    progress: Callable[[int], None] | None,
) -> Any:
    """Read, encode and sink every batch; returns the runner in use at the end."""
    device = getattr(runner, "device", torch.device("cpu"))
    batch = runner.batch_size or cfg.batch_size
    depth = min(cfg.queue_batches, math.ceil(int(coords.shape[0]) / batch))
    size = encoder.spec.input_size
    workers = reader_threads_for(cfg, device)
    if use_processes(cfg.readers, device.type):
        # depth buffers being filled + one being encoded, shared with the reader processes
        with shared_batches(depth + 1, batch, size) as shared:
            job = ReaderJob(
                str(reader.path), reader.info.slide_id, plan, size, shared.names(), batch
            )
            processes = ProcessReaders(job, workers)
            try:
                return _feed(
                    coords,
                    batch,
                    depth,
                    shared.arrays,
                    processes.submit,
                    processes.rows,
                    encoder,
                    runner,
                    sink,
                    progress,
                )
            finally:
                processes.shutdown()
    arrays = [_batch_buffer(batch, size, device) for _ in range(depth + 1)]
    fill = BatchFiller(reader, plan, size)
    pool = ThreadPoolExecutor(
        workers, thread_name_prefix="fedpath-read", initializer=_yield_to_inference
    )
    try:
        return _feed(
            coords,
            batch,
            depth,
            arrays,
            lambda i, block: pool.submit(fill, block, arrays[i]),
            lambda future: future.result(),
            encoder,
            runner,
            sink,
            progress,
        )
    finally:
        fill.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _feed(
    coords: np.ndarray,
    batch: int,
    depth: int,
    arrays: list[np.ndarray],
    submit_fill: Callable[[int, np.ndarray], Future[Any]],
    rows_of: Callable[[Future[Any]], int],
    encoder: LoadedEncoder,
    runner: Any,
    sink: Callable[[np.ndarray], None],
    progress: Callable[[int], None] | None,
) -> Any:
    """Keep ``depth`` batches being read while one is encoded; sink them in order.

    ``arrays`` are the reusable NHWC uint8 buffers (their torch views share the memory);
    ``submit_fill(i, block)`` starts filling buffer ``i``, ``rows_of`` waits for it.
    """
    n_batches = math.ceil(int(coords.shape[0]) / batch)
    views = [torch.from_numpy(a).permute(0, 3, 1, 2) for a in arrays]
    free = deque(range(len(arrays)))
    pending: deque[tuple[Future[Any], int]] = deque()
    next_batch = 0

    def submit() -> None:
        nonlocal next_batch
        while next_batch < n_batches and len(pending) < depth and free:
            index = free.popleft()
            block = coords[next_batch * batch : (next_batch + 1) * batch]
            pending.append((submit_fill(index, block), index))
            next_batch += 1

    submit()
    while pending:
        future, index = pending.popleft()
        rows = rows_of(future)
        submit()
        encoded = runner(views[index], rows)
        if getattr(runner, "verified_on_slide", True) is False:
            runner, encoded = _checked_first_batch(encoder, runner, views[index], rows, encoded)
        sink(encoded.numpy())
        free.append(index)
        if progress is not None:
            progress(rows)
    return runner
