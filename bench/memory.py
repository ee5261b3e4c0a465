"""Memory as the benchmarks measure it: the peak resident set of this process (VmHWM)."""

from __future__ import annotations

__all__ = ["mib", "peak_rss", "reset_peak_rss"]


def peak_rss() -> int:
    """Peak resident set size (VmHWM) of this process in bytes.

    VmHWM belongs to the address space, so a child started with exec measures only its own
    work; ``ru_maxrss`` would be inherited from the (larger) parent across fork+exec.
    """
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status (not Linux?)")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses.

    Lets one process report the peak of each message separately, as each message's own
    ClientApp process would see it in a deployment.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def mib(n: float | None) -> str:
    """Bytes as whole MiB with thousands separators ("-" for no measurement)."""
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"
