"""CPU inference engines for patch encoders beside PyTorch: ONNX Runtime and OpenVINO.

On CPUs without native bfloat16 (most hospital servers) PyTorch runs convolutional and
transformer encoders in float32 through generic kernels; ONNX Runtime and OpenVINO run the same
float32 graph 1.4-4.7× faster here (bench/embedding.py). The encoder is exported once to ONNX,
with its uint8 → float normalisation inside, and cached keyed by its weights hash, input size and
normalisation, so a hospital pays the export once per encoder, not once per slide or run.

Features must stay what PyTorch float32 computes: every engine is checked on a calibration
batch when it is built (and the pipeline checks it again on the first real batch); an engine
that falls below ``MIN_BACKEND_COSINE`` is not used and the reason is kept for the report.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedpath.client.embed.registry import EncoderSpec, LoadedEncoder
from fedpath.common.atomic import OutputWriteError, atomic_path, atomic_write_json
from fedpath.common.cpuinfo import read_cpuinfo
from fedpath.common.errors import EncoderError
from fedpath.common.hashing import sha256_json

BACKENDS: tuple[str, ...] = ("auto", "torch", "onnx", "openvino")
ENGINES: tuple[str, ...] = ("onnx", "openvino")
"""Backends that run an exported graph (the others are PyTorch itself)."""
EXPORT_VERSION = 1
"""Bumped whenever the exported graph's inputs, outputs or folding change (re-exports caches)."""
MIN_BACKEND_COSINE = 0.999
"""Per-patch cosine to PyTorch float32 below which an engine's features are not trusted."""
ONNX_OPSET = 17
CACHE_ENV = "FEDPATH_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$FEDPATH_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedpath``, else ``~/.cache/fedpath``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fedpath"


class NhwcPixelEncoder(torch.nn.Module):
    """uint8 (B, S, S, 3) pixels → normalise in float32 → encoder → (B, D) features.

    The pipeline's batch buffers are NHWC uint8 arrays; taking them as they are lets an engine
    read the reader's memory without a transpose copy per batch.
    """

    def __init__(self, model: torch.nn.Module, spec: EncoderSpec) -> None:
        super().__init__()
        self.model = model
        std = torch.tensor(spec.std, dtype=torch.float32)
        mean = torch.tensor(spec.mean, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1))
        self.register_buffer("offset", (-mean / std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float()
        return self.model(x * self.scale + self.offset)


def export_key(encoder: LoadedEncoder) -> str:
    """What an exported graph depends on: weights, input size, normalisation, export rules."""
    spec = encoder.spec
    return sha256_json(
        {
            "weights_sha256": encoder.weights_sha256,
            "input_size": spec.input_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "feature_dim": spec.feature_dim,
            "export_version": EXPORT_VERSION,
            "opset": ONNX_OPSET,
        }
    )


def export_path(encoder: LoadedEncoder, cache_dir: Path) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in encoder.spec.id) or "encoder"
    return cache_dir / "encoders" / f"{safe}-{export_key(encoder)[:16]}" / "pixels-nhwc.onnx"


def _exportable_model(encoder: LoadedEncoder) -> torch.nn.Module:
    """A float32 CPU copy of the encoder with BatchNorm folded, wrapped to take NHWC uint8."""
    model = encoder.model
    if not isinstance(model, torch.jit.ScriptModule):
        model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).float()
        fold = getattr(model, "fold_batchnorm", None)
        if callable(fold):
            fold()
    return NhwcPixelEncoder(model, encoder.spec).eval()


def export_onnx(encoder: LoadedEncoder, cache_dir: Path) -> tuple[Path, bool]:
    """(path of the encoder's ONNX graph, whether it was exported now); cached by export_key.

    Raises ``EncoderError`` when the model cannot be exported and ``OutputWriteError`` when
    the cache cannot be written (callers then export into a temporary folder instead).
    """
    final = export_path(encoder, cache_dir)
    if final.is_file() and final.stat().st_size > 0:
        return final, False
    model = _exportable_model(encoder)
    size = encoder.spec.input_size
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    with atomic_path(final) as tmp:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    input_names=["pixels"],
                    output_names=["features"],
                    dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                    opset_version=ONNX_OPSET,
                )
        except OutputWriteError:
            raise
        except Exception as exc:  # the exporter raises many types for unsupported models
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EncoderError(f"{encoder.spec.id}: cannot export to ONNX ({first})") from exc
    return final, True


@dataclass
class EngineRunner:
    """An exported encoder behind the pipeline's runner interface.

    Called with the pipeline's (B, 3, S, S) uint8 view of an NHWC buffer; returns (n, D)
    float32 torch features of the first ``rows`` rows.
    """

    run_nhwc: Callable[[np.ndarray], np.ndarray]
    mode: str
    precision: str = "float32"
    batch_size: int | None = None
    verified_on_slide: bool = False

    def __call__(self, batch: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        n = batch.shape[0] if rows is None else rows
        if batch.dtype != torch.uint8:
            raise TypeError(f"{self.mode} runner takes uint8 pixels, got {batch.dtype}")
        nhwc = batch.permute(0, 2, 3, 1)
        if not nhwc.is_contiguous():
            nhwc = nhwc.contiguous()
        out = self.run_nhwc(nhwc.numpy())
        return torch.from_numpy(np.ascontiguousarray(out[:n], dtype=np.float32))


def onnx_runner(path: Path, threads: int) -> EngineRunner:
    """An ONNX Runtime CPU session on ``path`` with ``threads`` intra-op threads.

    Spin-waiting is off: the reader threads need the same cores between encoder calls, and a
    spinning pool takes them (the same reason readers run at low priority).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # corrupt cache file, unsupported op: the caller falls back
        raise EncoderError(f"ONNX Runtime cannot load {path}: {exc}") from exc

    def run(pixels: np.ndarray) -> np.ndarray:
        return session.run(None, {"pixels": pixels})[0]

    return EngineRunner(run, "onnx")


def openvino_runner(path: Path, threads: int, precision: str) -> EngineRunner:
    """An OpenVINO CPU model compiled from the ONNX graph, latency-oriented, ``threads`` threads.

    ``precision`` float32 pins OpenVINO's inference precision to f32 (on bf16-capable CPUs it
    would otherwise silently choose bf16); bfloat16 lets it use bf16 where the CPU has it.
    Compiled blobs are cached next to the ONNX file, so later processes start faster.
    """
    import openvino as ov

    core = ov.Core()
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bfloat16" else "f32",
        "CACHE_DIR": str(path.parent / "openvino"),
    }
    try:
        compiled = core.compile_model(str(path), "CPU", config)
    except Exception as exc:  # unsupported op, unwritable cache dir: the caller falls back
        raise EncoderError(f"OpenVINO cannot compile {path}: {exc}") from exc
    request = compiled.create_infer_request()

    def run(pixels: np.ndarray) -> np.ndarray:
        return np.asarray(request.infer({0: pixels})[0])

    return EngineRunner(run, "openvino", precision)


def build_engine(
    backend: str, encoder: LoadedEncoder, precision: str, threads: int, cache_dir: Path
) -> tuple[EngineRunner, list[str]]:
    """An engine runner for ``backend`` ("onnx" | "openvino") and notes on how it was built."""
    notes: list[str] = []
    try:
        path, fresh = export_onnx(encoder, cache_dir)
        if fresh:
            notes.append(f"exported {encoder.spec.id} to ONNX once: {path}")
    except OutputWriteError as exc:
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="fedpath-export-"))
        notes.append(f"export cache not writable ({exc}); exported for this run only")
        path, _ = export_onnx(encoder, scratch)
    if backend not in ENGINES:
        raise ValueError(f"not an engine backend: {backend!r}")
    if backend == "onnx" and precision != "float32":
        raise EncoderError("the onnx backend runs float32 only")

    def load(graph: Path) -> EngineRunner:
        if backend == "onnx":
            return onnx_runner(graph, threads)
        return openvino_runner(graph, threads, precision)

    try:
        return load(path), notes
    except EncoderError:
        if fresh:
            raise
    # A cached graph that no longer loads (truncated by a full disk, an engine upgrade):
    # export it again once rather than giving up on the engine.
    path.unlink(missing_ok=True)
    path, _ = export_onnx(encoder, path.parents[2])
    notes.append(f"re-exported {encoder.spec.id}: the cached graph did not load")
    return load(path), notes


# ------------------------------------------------------------------ per-machine choice cache


def machine_key(threads: int, batch_size: int, precision: str) -> str:
    """What makes one engine faster than another here: CPU, threads, batch, library versions."""
    vendor, flags = read_cpuinfo()
    model_name = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model_name = line.partition(":")[2].strip()
                break
    versions = {"torch": torch.__version__}
    for name in ("onnxruntime", "openvino"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[name] = version(name)
    return sha256_json(
        {
            "cpu": [vendor, model_name or platform.processor(), sorted(flags)],
            "threads": threads,
            "batch": batch_size,
            "precision": precision,
            "versions": versions,
        }
    )


def choice_path(encoder: LoadedEncoder, cache_dir: Path) -> Path:
    """Where the fastest backend measured per machine is remembered for ``encoder``."""
    return export_path(encoder, cache_dir).parent / "backend-choice.json"


def read_choice(encoder: LoadedEncoder, cache_dir: Path, key: str) -> str | None:
    path = choice_path(encoder, cache_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    choice = data.get(key, {}).get("backend") if isinstance(data, dict) else None
    return choice if choice in BACKENDS[1:] else None


def write_choice(
    encoder: LoadedEncoder, cache_dir: Path, key: str, backend: str, rates: dict[str, float]
) -> None:
    """Remember this machine's fastest backend; an unwritable cache only costs a re-measure."""
    path = choice_path(encoder, cache_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = {
        "backend": backend,
        "patches_per_second": {k: round(v, 1) for k, v in rates.items()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with contextlib.suppress(OutputWriteError):
        atomic_write_json(path, data)
