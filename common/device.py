"""Which torch device a job runs on: one parser and one resolver for every command.

Preparation, local training and the ClientApp all take the same ``device`` setting
(``auto | cpu | cuda | cuda:N | mps``), so a hospital names its GPU once and the same words mean
the same thing everywhere. ``auto`` picks a GPU only when torch itself sees one; an explicit
GPU that is absent is an error (silently training on the CPU would take days longer and report
nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpath.common.device_name import check_device_name
from fedpath.common.errors import DeviceError

if TYPE_CHECKING:  # torch is imported where a device is resolved: configs stay torch-free
    import torch


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` stands for on this machine; raises ``DeviceError`` if absent."""
    import torch

    try:
        wanted = check_device_name(name)
    except ValueError as exc:
        raise DeviceError(str(exc)) from exc
    if wanted == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if wanted == "cpu":
        return torch.device("cpu")
    if wanted == "mps":
        if not _mps_available():
            raise DeviceError("device 'mps' asked for, but torch sees no Apple GPU (MPS) here")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {wanted!r} asked for, but torch sees no CUDA GPU here (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu "
            "or auto, or install a CUDA build of torch"
        )
    index = int(wanted.split(":")[1]) if ":" in wanted else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {wanted!r} asked for, but torch sees {count} CUDA GPU(s)")
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    """A short human label: 'cpu', 'cuda:0 (NVIDIA A100-SXM4-40GB)', 'mps'."""
    import torch

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device.type
