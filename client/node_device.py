"""Which device a hospital's node trains and evaluates on: its node config key ``device``.

The device is the hospital's choice, like its data folder and its thread cap: it is read from
the SuperNode's node config (``fedpath node --device cuda:1`` writes it there), never from the
run config or the round instructions, which the server writes for every site alike. The
spelling and the resolution are ``fedpath.common.device``'s, as for ``prepare`` and ``local train``.

Kept free of torch at import: the ClientApp's message process imports this module and must
stay light when it only forwards to the resident worker; torch is imported where the device
is resolved, inside the handlers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedpath.common.device_name import DEVICE_HELP, check_device_name
from fedpath.common.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["NODE_DEVICE_KEY", "node_device", "node_device_name"]

NODE_DEVICE_KEY = "device"


def node_device_name(node_config: Mapping[str, Any]) -> str:
    """The node's ``device`` setting, normalised (default ``auto``); ConfigError if misspelt."""
    value = node_config.get(NODE_DEVICE_KEY)
    if value is None or value == "":
        return "auto"
    if not isinstance(value, str):
        raise ConfigError(f"node config {NODE_DEVICE_KEY} must be {DEVICE_HELP}; got {value!r}")
    try:
        return check_device_name(value)
    except ValueError as exc:
        raise ConfigError(f"node config {exc}") from exc


CUBLAS_WORKSPACE = ":4096:8"
"""What NVIDIA documents for reproducible cuBLAS results (a fixed workspace per stream)."""


def node_device(node_config: Mapping[str, Any]) -> torch.device:
    """The torch device the node's setting stands for here; ``DeviceError`` if it is absent
    (a GPU asked for by name that torch does not see is never replaced by the CPU).

    On a CUDA GPU it also sets ``CUBLAS_WORKSPACE_CONFIG`` (unless the hospital set it),
    which cuBLAS reads when this process first uses it: DP-SGD rounds must be bit-for-bit
    reproducible on a retry (:func:`fedpath.client.training.private_trainer.deterministic_on`), and
    the node resolves its device before anything touches the GPU.
    """
    from fedpath.common import device as devices

    resolved = devices.resolve_device(node_device_name(node_config))
    if resolved.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    return resolved
