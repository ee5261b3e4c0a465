"""What the fault tests share: tiny sites, bounded waits, and SIGKILL to whole process groups.

The fault tests live in three files so that pytest-xdist's ``--dist loadfile`` runs the three
long real-process scenarios on different workers at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpath.deploy.local_network import LocalNetwork
from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site

ROOT = Path(__file__).resolve().parents[1]
SPEC = SyntheticSiteSpec(n_slides=8, feature_dim=8, patches=(5, 15))
BASE_RUN: dict[str, Any] = {
    "local-epochs": 1,
    "model": "abmil",
    "supervision": "weak",
}


# -- helpers -----------------------------------------------------------------------------------


def wait(condition: Callable[[], bool], what: str, timeout: float, net: LocalNetwork) -> None:
    """Poll ``condition`` for at most ``timeout`` s; fail naming ``what`` with the logs."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} (waited {timeout:.0f} s): {dict(net.logs())}"
        time.sleep(0.5)


def recorded_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The round records of ``metrics.jsonl`` (rewritten atomically, so never torn)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def group_commands(pgid: int) -> list[str]:
    """Command lines of the live processes of one process group (from /proc).

    The SuperNode runs each message's ClientApp in a child process of its own group, so a
    ``flwr-clientapp`` here means the site is working on a message right now.
    """
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                out.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    return out


def detached_groups(parent_pid: int) -> set[int]:
    """Process groups of the SuperExecs a process started in their own session.

    Flower 1.41's SuperLink starts its SuperExec detached (``start_new_session``), passing
    ``--parent-pid``; the ServerApp it starts stays in that SuperExec's group, so killing the
    SuperLink's group alone would leave the ServerApp running.
    """
    out: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if (
                b"--parent-pid" in argv
                and argv[argv.index(b"--parent-pid") + 1] == str(parent_pid).encode()
            ):
                out.add(os.getpgid(int(entry.name)))
    return out


def kill_pgid(pgid: int, what: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while group_commands(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_commands(pgid), f"{what}: processes outlived SIGKILL"


def kill_group(net: LocalNetwork, name: str) -> None:
    """SIGKILL a started process and every process of its group, as a power cut would."""
    managed = net.processes[name]
    os.killpg(managed.process.pid, signal.SIGKILL)
    managed.process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while group_commands(managed.process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_commands(managed.process.pid), f"{name}: processes outlived SIGKILL"


def node_ids(log_text: str) -> list[int]:
    """Every ``SuperNode ID: N`` Flower logged when the SuperNode (re)activated."""
    return [int(m) for m in re.findall(r"SuperNode ID: (\d+)", log_text)]


def write_sites(root: Path, names: str) -> dict[str, Path]:
    return {
        f"site_{n}": write_synthetic_site(root / f"site_{n}", SPEC, seed=i)
        for i, n in enumerate(names)
    }


# -- the round loop's view of a lost site (fast) ------------------------------------------------
