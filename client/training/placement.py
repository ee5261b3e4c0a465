"""Where and in what precision a training or evaluation step runs, shared by both trainers.

The plain trainer (``trainer``) and DP-SGD (``private_trainer``) put a batch on the model's
device the same way, cast it for the same low precision and seed dropout in a torch RNG
private to the step: one definition here keeps the two from drifting apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal

import torch

from fedpath.client.training.bags import Bag, BagBatch, collate
from fedpath.common.mil.models import MILModel

__all__ = [
    "Precision",
    "collate_for",
    "model_device",
    "precision_autocast",
    "private_torch_rng",
    "to_device",
]

Precision = Literal["float32", "bfloat16", "float16"]
"""What the per-patch layers ran in. ``float16`` is never asked for in a config: ``auto`` picks
it on a CUDA GPU without native bfloat16, for the plain trainer only
(:func:`~fedpath.client.training.trainer.resolve_precision`)."""

_LOW_PRECISION = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def model_device(model: MILModel) -> torch.device:
    """The device the model's parameters are on (the CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def private_torch_rng(device: torch.device) -> Iterator[None]:
    """Seeding torch inside this block leaves the caller's global RNG state untouched: the
    CPU's, and the training device's (dropout on a GPU draws from the GPU's generator)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        devices: list[int | str] = [index]
    elif device.type == "mps":
        devices = ["mps"]  # one MPS device; its module ignores the id
    else:
        devices = []
    kind = device.type if devices else None
    with torch.random.fork_rng(devices=devices, device_type=kind):
        yield


def precision_autocast(device: torch.device, precision: Precision) -> AbstractContextManager[Any]:
    """Low-precision autocast for the per-patch layers; the model keeps its softmax, pooling
    and slide head in its own precision."""
    if precision == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=_LOW_PRECISION[precision])


def collate_for(bags: Sequence[Bag], precision: Precision, device: torch.device) -> BagBatch:
    """A batch as the precision and device want it.

    float32 is batched as loaded. In a low precision the features are cast once while
    batching (autocast would cast them anyway, and half the bytes cross the bus to a GPU);
    on a CPU they are also padded to :func:`~fedpath.client.training.bags.bucket_length`, so
    oneDNN reuses its compiled kernels across slides of similar length. A batch bound for a
    CUDA GPU is built in pinned memory (:func:`~fedpath.client.training.bags.collate`).
    """
    pin = device.type == "cuda"
    if precision == "float32":
        return collate(bags, pin_memory=pin)
    dtype = _LOW_PRECISION[precision]
    return collate(bags, dtype=dtype, bucket=device.type == "cpu", pin_memory=pin)


def to_device(batch: BagBatch, device: torch.device) -> BagBatch:
    """The batch on ``device``; copies from pinned memory run asynchronously (the stream
    orders them before the kernels that read them)."""
    if device.type == "cpu":
        return batch

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=t.is_pinned())

    return BagBatch(
        features=move(batch.features),
        mask=move(batch.mask),
        labels=move(batch.labels),
        patch_labels=tuple(move(p) if p is not None else None for p in batch.patch_labels),
        annotation_complete=batch.annotation_complete,
        slide_ids=batch.slide_ids,
    )
