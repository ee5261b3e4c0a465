"""The federation benchmark's part 1: what a Flower message costs before any work is done.

Fresh interpreters (``python -c``) import what a ClientApp message process imports, ours and
Flower's floor (the no-op app of ``bench/noop_app``), interleaved and repeated; ``python -X
importtime`` of a train-message process then says where the time goes and which third-party
packages our modules pull in directly.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOOP_APP = ROOT / "bench" / "noop_app"
FIRST_PARTY = ("fedpath", "noop_app")
"""Top-level packages that are ours in ``-X importtime`` output."""


@dataclass(frozen=True)
class Startup:
    """One start-up variant: what a fresh ``python -c`` process does before it exits."""

    key: str
    label: str
    code: str


FLWR_RUNTIME = "import flwr.supernode.cli.flwr_clientapp"
FIRST_ADAM = "torch.optim.Adam([torch.zeros(1, requires_grad=True)])"
STARTUP = [
    Startup("bare", "bare interpreter (python -c pass)", "pass"),
    Startup("flwr", "import flwr.clientapp", "import flwr.clientapp"),
    Startup("runtime", "flwr-clientapp runtime (Flower's process, no app)", FLWR_RUNTIME),
    Startup("app", "import fedpath.client.app (our module level)", "import fedpath.client.app"),
    Startup(
        "handler",
        "fedpath.client.app + handler imports (fedpath.client.federated)",
        "import fedpath.client.app, fedpath.client.federated",
    ),
    Startup("torch", "import torch", "import torch"),
    Startup("adam", "import torch + first torch.optim.Adam()", f"import torch; {FIRST_ADAM}"),
    Startup("sklearn", "import sklearn.metrics", "import sklearn.metrics"),
    Startup(
        "noop", "no-op message: runtime + noop ClientApp", f"{FLWR_RUNTIME}, noop_app.client_app"
    ),
    Startup(
        "forward",
        "fedpath message forwarded to the resident worker",
        f"{FLWR_RUNTIME}, fedpath.client.app, fedpath.client.worker_client, "
        "fedpath.client.error_reply",
    ),
    Startup(
        "evaluate",
        "fedpath evaluate message: runtime + app + handler",
        f"{FLWR_RUNTIME}, fedpath.client.app, fedpath.client.federated",
    ),
    Startup(
        "train",
        "fedpath train message: ... + first optimiser",
        f"{FLWR_RUNTIME}, fedpath.client.app, fedpath.client.federated, torch; {FIRST_ADAM}",
    ),
]
BY_KEY = {v.key: v for v in STARTUP}


def child_env() -> dict[str, str]:
    """Environment of the start-up subprocesses: the no-op app importable too."""
    env = dict(os.environ)
    paths = [str(NOOP_APP), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return env


# ------------------------------------------------------------------------ start-up


def time_import(code: str, env: dict[str, str], timeout: float = 120.0) -> float:
    """Wall seconds of a fresh ``python -c code`` (process start to exit)."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=timeout,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def measure_startup(repeats: int) -> dict[str, list[float]]:
    """Each variant ``repeats`` times, interleaved (after one untimed warm-up round)."""
    env = child_env()
    for variant in STARTUP:  # warm the page cache and __pycache__
        time_import(variant.code, env)
    times: dict[str, list[float]] = {v.key: [] for v in STARTUP}
    for _ in range(repeats):
        for variant in STARTUP:
            times[variant.key].append(time_import(variant.code, env))
    return times


@dataclass(frozen=True)
class ImportLine:
    """One line of ``-X importtime``: a module, its own and cumulative microseconds, depth."""

    name: str
    self_us: int
    cumulative_us: int
    depth: int


def parse_importtime(text: str) -> list[ImportLine]:
    """The ``import time:`` lines of stderr, in the order Python printed them."""
    out = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative, name = line[len("import time:") :].split("|", 2)
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        out.append(ImportLine(name.strip(), int(self_us), int(cumulative), depth))
    return out


def first_party(module: str) -> bool:
    return module.split(".", 1)[0] in FIRST_PARTY


def direct_third_party(lines: Sequence[ImportLine]) -> list[tuple[str, str, float]]:
    """(our importer, third-party module, cumulative s) for imports our modules make directly.

    ``-X importtime`` prints a module after everything it imported, one level deeper; walking
    the lines backwards therefore meets each parent before its children.
    """
    found: list[tuple[str, str, float]] = []
    stack: list[ImportLine] = []
    for line in reversed(lines):
        while stack and stack[-1].depth >= line.depth:
            stack.pop()
        parent = stack[-1] if stack else None
        if parent is not None and first_party(parent.name) and not first_party(line.name):
            found.append((parent.name, line.name, line.cumulative_us / 1e6))
        stack.append(line)
    return sorted(found, key=lambda f: -f[2])


def own_time_by_package(lines: Iterable[ImportLine]) -> dict[str, float]:
    """Seconds spent in each top-level package's own module code (self times summed)."""
    totals: dict[str, float] = {}
    for line in lines:
        root = line.name.split(".", 1)[0]
        totals[root] = totals.get(root, 0.0) + line.self_us / 1e6
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def importtime_of(code: str) -> list[ImportLine]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=ROOT,
        env=child_env(),
        check=True,
        timeout=120.0,
        capture_output=True,
        text=True,
    )
    return parse_importtime(done.stderr)


def median(values: Iterable[float]) -> float:
    """The median, NaN for no values (a variant that never ran)."""
    data = list(values)
    return statistics.median(data) if data else float("nan")


def print_startup(times: dict[str, list[float]], repeats: int) -> dict[str, float]:
    """The start-up table and what our code adds; the medians by variant key."""
    med = {key: median(ts) for key, ts in times.items()}
    print(f"\n1. ClientApp start-up (fresh interpreter, wall s, median of {repeats}, interleaved)")
    print(f"{'':52s} {'median':>7s} {'min':>7s} {'- bare':>7s}")
    for v in STARTUP:
        ts = times[v.key]
        print(f"{v.label:52s} {med[v.key]:7.2f} {min(ts):7.2f} {med[v.key] - med['bare']:7.2f}")
    print(
        f"   per message over the no-op floor ({med['noop']:.2f} s): forwarded to the worker "
        f"+{med['forward'] - med['noop']:.2f} s; in a fresh process evaluate "
        f"+{med['evaluate'] - med['noop']:.2f} s ({med['evaluate'] / med['noop']:.1f}x), "
        f"train +{med['train'] - med['noop']:.2f} s ({med['train'] / med['noop']:.1f}x)"
    )
    print(
        f"   ours: fedpath.client.app {med['app'] - med['bare']:.2f} s over bare "
        f"(flwr.clientapp alone "
        f"{med['flwr'] - med['bare']:.2f}); handler imports {med['handler'] - med['app']:.2f} s "
        f"(torch alone {med['torch'] - med['bare']:.2f}, sklearn.metrics alone "
        f"{med['sklearn'] - med['bare']:.2f}); first torch.optim optimiser "
        f"{med['adam'] - med['torch']:.2f} s (it imports torch._dynamo)"
    )
    return med


def print_importtime(lines: list[ImportLine]) -> None:
    """Where the train message's import time goes, and which of our modules pulls what in."""
    total = sum(line.self_us for line in lines) / 1e6
    print(f"\n   -X importtime, one fedpath train-message process ({total:.2f} s of imports):")
    top = [line for line in lines if line.depth == 0 and line.cumulative_us >= 50_000]
    print("   top level: " + ", ".join(f"{t.name} {t.cumulative_us / 1e6:.2f}" for t in top))
    by_package = list(own_time_by_package(lines).items())[:8]
    print("   own module time by package: " + ", ".join(f"{k} {v:.2f}" for k, v in by_package))
    print("   third-party imports our modules make directly (cumulative s):")
    for importer, module, seconds in direct_third_party(lines)[:6]:
        if seconds >= 0.05:
            print(f"     {importer:28s} -> {module:20s} {seconds:6.2f}")
