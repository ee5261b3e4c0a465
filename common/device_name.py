"""The spelling of a device setting, checked when a config is read.

Apart from ``fedpath.common.device`` (which resolves a name with torch) so that configs, and
the slide-reading code that reads them, never import torch.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

__all__ = ["DEVICE_HELP", "DeviceName", "check_device_name"]

DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps (auto: a GPU when torch sees one, else the CPU)"
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_name(value: str) -> str:
    """Validate the spelling of a device setting (presence is checked when it is resolved)."""
    name = value.strip().lower()
    if not _DEVICE_PATTERN.match(name):
        raise ValueError(f"device must be {DEVICE_HELP}; got {value!r}")
    return name


DeviceName = Annotated[str, AfterValidator(check_device_name)]
"""A pydantic field type for device settings: spelling checked when the config is read."""
