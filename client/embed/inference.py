"""How an encoder runs on this machine: device, precision, engine, batch size, reader threads.

Decided once per encoder and process, before the first slide, and written into the site's
report, so a hospital can see what ran (``onnx on cpu, float32, batch 8``) and why. The choice
never changes features beyond the cosine gates: lower precision and other engines are used only
after their features were compared with PyTorch float32 on a calibration batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedpath.client.config import EmbeddingConfig
from fedpath.client.embed.backends import (
    ENGINES,
    MIN_BACKEND_COSINE,
    EngineRunner,
    build_engine,
    choice_path,
    default_cache_dir,
    machine_key,
    read_choice,
    write_choice,
)
from fedpath.client.embed.extract import (
    CALIBRATION_PATCHES,
    Runner,
    calibration_images,
    choose_precision,
    cosines,
    get_runner,
    normalise_images,
    planned_runner_key,
    reader_threads_for,
)
from fedpath.client.embed.readers import use_processes
from fedpath.client.embed.registry import LoadedEncoder
from fedpath.client.threads import torch_threads
from fedpath.common.device import describe_device, resolve_device
from fedpath.common.errors import ConfigError, EncoderError

GPU_BATCH_CAP = 512
"""Largest batch tried on a GPU: beyond it throughput no longer grows for patch encoders."""
GPU_MEMORY_SHARE = 0.5
"""Share of the GPU's free memory a batch may take (autocast workspaces and fragmentation)."""
TIMING_RUNS = 3


@dataclass(frozen=True)
class InferencePlan:
    """What runs the encoder here, and the evidence for it."""

    device: str
    precision: str
    precision_cosine: float | None
    backend: str
    backend_cosine: float | None
    batch_size: int
    reader_threads: int
    rates: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    reader_processes: bool = False

    def describe(self) -> str:
        """One line for logs: 'onnx on cpu, float32, batch 8, 2 reader threads'."""
        text = (
            f"{self.backend} on {self.device}, {self.precision}, batch {self.batch_size}, "
            f"{self.reader_threads} reader thread(s)"
        )
        if self.backend_cosine is not None:
            text += f"; cosine to PyTorch float32 ≥ {self.backend_cosine:.5f}"
        return text

    def as_json(self) -> dict[str, object]:
        return {
            "device": self.device,
            "precision": self.precision,
            "precision_cosine": self.precision_cosine,
            "backend": self.backend,
            "backend_cosine": self.backend_cosine,
            "batch_size": self.batch_size,
            "reader_threads": self.reader_threads,
            "reader_processes": self.reader_processes,
            "measured_patches_per_second": self.rates,
            "notes": list(self.notes),
        }


def batch_for_memory(free_bytes: int, per_patch_bytes: int, cap: int = GPU_BATCH_CAP) -> int:
    """Largest power-of-two batch whose activations fit in ``GPU_MEMORY_SHARE`` of free memory."""
    budget = free_bytes * GPU_MEMORY_SHARE
    batch = 1
    while batch * 2 <= cap and batch * 2 * max(per_patch_bytes, 1) <= budget:
        batch *= 2
    return batch


def _gpu_batch_size(encoder: LoadedEncoder, device: torch.device, precision: str) -> int:
    """Measure one batch's peak memory per patch on ``device`` and size batches to fit."""
    probe = 8
    runner = get_runner(encoder, precision, probe, jit=False, pixels=True, device=device)
    images = calibration_images(encoder.spec, probe)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        runner(images)
        torch.cuda.synchronize(device)
        per_patch = (torch.cuda.max_memory_allocated(device) - base) // probe
        free, _ = torch.cuda.mem_get_info(device)
        return batch_for_memory(int(free), int(per_patch))
    return 64  # MPS reports no per-call peak: a batch that suits its unified memory


def _gpu_precision(
    encoder: LoadedEncoder, cfg: EmbeddingConfig, device: torch.device
) -> tuple[str, float | None]:
    """The GPU's native low precision when its features stay within the cosine gate."""
    if cfg.precision != "auto":
        return cfg.precision, None
    native = "float16"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        native = "bfloat16"
    images = calibration_images(encoder.spec, CALIBRATION_PATCHES, seed=1)
    reference = get_runner(encoder, "float32", CALIBRATION_PATCHES, jit=False, device=device)(
        normalise_images(encoder.spec, images)
    )
    candidate = get_runner(encoder, native, cfg.batch_size, jit=False, pixels=True, device=device)
    mean_cos = float(cosines(candidate(images), reference).mean())
    return (native if mean_cos >= cfg.min_bf16_cosine else "float32"), mean_cos


def _time(runner: Runner | EngineRunner, images: torch.Tensor) -> float:
    runner(images)
    start = time.perf_counter()
    for _ in range(TIMING_RUNS):
        runner(images)
    return TIMING_RUNS * images.shape[0] / (time.perf_counter() - start)


def plan_inference(encoder: LoadedEncoder, cfg: EmbeddingConfig) -> InferencePlan:
    """Decide device, precision, engine and batch size; cache the chosen runner on the encoder.

    ``extract_features`` then uses that runner for every slide of the run. Raises
    ``DeviceError`` for an absent device and ``ConfigError`` for an engine asked for on a GPU.
    """
    device = resolve_device(cfg.device)
    threads = cfg.torch_threads or torch.get_num_threads()
    explicit = cfg.model_fields_set
    if device.type != "cpu":
        if cfg.backend in ENGINES:
            raise ConfigError(
                f"backend {cfg.backend} runs on the CPU; with device {cfg.device} use backend "
                "torch or auto (GPUs run PyTorch)"
            )
        precision, cosine = _gpu_precision(encoder, cfg, device)
        batch = (
            cfg.batch_size
            if "batch_size" in explicit
            else _gpu_batch_size(encoder, device, precision)
        )
        runner = get_runner(encoder, precision, batch, jit=False, pixels=True, device=device)
        encoder.runners[planned_runner_key(precision)] = runner
        return InferencePlan(
            describe_device(device),
            precision,
            cosine,
            "torch",
            None,
            batch,
            reader_threads_for(cfg, device),
            reader_processes=use_processes(cfg.readers, device.type),
        )

    batch = cfg.batch_size
    with torch_threads(cfg.torch_threads):
        precision, cosine = choose_precision(encoder, cfg)
        chosen, backend_cosine, rates, notes = _choose_cpu_backend(encoder, cfg, precision, threads)
    encoder.runners[planned_runner_key(precision)] = chosen
    return InferencePlan(
        "cpu",
        precision,
        cosine,
        chosen.mode if isinstance(chosen, EngineRunner) else "torch",
        backend_cosine,
        batch,
        cfg.reader_threads,
        rates,
        tuple(notes),
        reader_processes=use_processes(cfg.readers, "cpu"),
    )


def _choose_cpu_backend(
    encoder: LoadedEncoder, cfg: EmbeddingConfig, precision: str, threads: int
) -> tuple[Runner | EngineRunner, float | None, dict[str, float], list[str]]:
    """(runner, its cosine to float32, measured rates, notes) for the configured backend."""
    batch = cfg.batch_size

    def torch_runner() -> Runner:  # built (traced, warmed up) only when it is needed
        return get_runner(encoder, precision, batch, jit=cfg.jit, pixels=True)

    if cfg.backend == "torch":
        return torch_runner(), None, {}, []
    cache_dir = Path(cfg.export_cache) if cfg.export_cache else default_cache_dir()
    candidates = [b for b in ENGINES if not (b == "onnx" and precision != "float32")]
    if cfg.backend != "auto":
        if cfg.backend not in candidates:
            note = f"backend {cfg.backend} runs float32 only; precision {precision} uses torch"
            return torch_runner(), None, {}, [note]
        candidates = [cfg.backend]
    key = machine_key(threads, batch, precision)
    remembered = read_choice(encoder, cache_dir, key) if cfg.backend == "auto" else None
    if remembered == "torch":
        return torch_runner(), None, {}, ["backend torch: fastest here when last measured"]
    notes: list[str] = []
    if remembered in candidates:
        candidates = [remembered]
        notes.append(
            f"backend {remembered}: the fastest when last measured on this machine "
            f"(delete {choice_path(encoder, cache_dir)} to measure again)"
        )

    images = calibration_images(encoder.spec, batch, seed=2)
    reference = get_runner(encoder, "float32", batch, jit=False)(
        normalise_images(encoder.spec, images)
    )
    gate = MIN_BACKEND_COSINE if precision == "float32" else cfg.min_bf16_cosine
    built: dict[str, tuple[EngineRunner, float]] = {}
    for name in candidates:
        try:
            runner, how = build_engine(name, encoder, precision, threads, cache_dir)
        except EncoderError as exc:
            notes.append(f"backend {name} unavailable: {exc}")
            continue
        notes.extend(how)
        cos = float(cosines(runner(images), reference).min())
        if cos < gate:
            notes.append(
                f"backend {name} not used: its features reach cosine {cos:.5f} to PyTorch "
                f"float32 on the calibration batch (needs ≥ {gate})"
            )
            continue
        built[name] = (runner, cos)
    if not built:
        return torch_runner(), None, {}, notes
    if len(built) == 1 and (cfg.backend != "auto" or remembered is not None):
        name, (runner, cos) = next(iter(built.items()))
        return runner, cos, {}, notes
    rates = {"torch": _time(torch_runner(), images)}
    rates.update({name: _time(runner, images) for name, (runner, _) in built.items()})
    best = max(rates, key=lambda name: rates[name])
    write_choice(encoder, cache_dir, key, best, rates)
    summary = ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items())
    notes.append(f"measured patches/s on this machine: {summary}; using {best}")
    if best == "torch":
        return torch_runner(), None, rates, notes
    runner, cos = built[best]
    return runner, cos, rates, notes
