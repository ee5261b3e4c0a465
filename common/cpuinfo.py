"""The CPU's vendor and feature flags, as Linux reports them: both sides choose bfloat16 by them."""

from __future__ import annotations

from pathlib import Path

__all__ = ["read_cpuinfo"]


def read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str]]:
    """(vendor id, feature flags) from ``path``; ("", empty) when unreadable (not Linux).

    Flags are the union of every ``flags`` (x86) and ``Features`` (ARM) line.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "", frozenset()
    vendor, flags = "", set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name == "vendor_id" and not vendor:
            vendor = value.strip()
        elif name in ("flags", "Features"):
            flags.update(value.split())
    return vendor, frozenset(flags)
