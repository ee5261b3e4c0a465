"""The machine line every benchmark prints first: a figure means little without it."""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

from fedpath.common.cpuinfo import read_cpuinfo

__all__ = ["load_average", "machine"]

WIDE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "bf16")
"""CPU flags that decide which inference and training paths are fast (bfloat16 among them)."""
LIBRARIES = {
    "numpy": "numpy",
    "OpenCV": "opencv-python-headless",
    "torch": "torch",
    "flwr": "flwr",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
}
"""Versions printed (distribution names: read from the metadata, so nothing is imported)."""


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other jobs on a shared machine skew timings."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _versions() -> str:
    found = []
    for name, distribution in LIBRARIES.items():
        try:
            found.append(f"{name} {version(distribution)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def _torch_line() -> str:
    """Threads and bfloat16 hardware, when this process has torch loaded (a benchmark that
    does not use torch does not import it to describe it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return ""
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return f"; torch {torch.get_num_threads()} intra-op threads, AMX usable by oneDNN: {amx}"


def machine() -> str:
    """CPU model and flags, usable cores, load, Python and library versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _, flags = read_cpuinfo()
    wide = " ".join(f for f in WIDE_FLAGS if f in flags) or "none of avx2/avx512/amx"
    return (
        f"{_cpu_model()}; {usable} usable core(s) of {os.cpu_count()}; flags: {wide}; "
        f"load average {load_average()}; Python {platform.python_version()}, {_versions()}"
        f"{_torch_line()}"
    )
