"""Federation benchmark: ClientApp start-up cost and s/round of a real 3-site deployment.

Usage (from the repository root)::

    .venv/bin/python -m bench.federation            # 20 slides × 200 patches × 1280-d per site
    .venv/bin/python -m bench.federation --quick    # tiny sites, 1 round: a smoke run

Every Flower message runs in a fresh ClientApp process, so what a message costs before any
work is done (interpreter, Flower's runtime, our imports) is paid twice per site and round
(train, evaluate), plus once for the harmonisation query and once for the final test.
Two parts, each comparing ours to a floor measured in the same run:

1. Start-up (``bench.startup``): fresh interpreters import what a ClientApp message process
   imports, ours and the no-op app's (Flower's floor), interleaved, medians; then where a
   train message's import time goes (``python -X importtime``).

2. Deployment. One SuperLink and three SuperNodes on loopback (``deploy.local_network``), each
   node pointing at a synthetic prepared site (``fedpath.synthetic.site``, cached under
   ``bench/_cache/federation/``). In rotating order: our app (``flwr run .``, FedMix,
   clam_sb small, 1 local epoch) on nodes with the resident worker (``fedpath node``'s
   default), our app on a second network whose nodes run every message in a fresh process
   (``--no-resident-worker``), and the no-op app of ``bench/noop_app`` (same
   messages: a query, per round one train and one evaluate message per site carrying arrays of
   our model's shapes, a final evaluate; its ClientApp answers at once). Per-round seconds
   come from our ``metrics.jsonl`` and the no-op app's equivalent file; whole-run wall time,
   ClientApp seconds and traffic from ``flwr ls --format json``. Our round is then split into
   compute at the sites (the slowest site's train and evaluate handler seconds, as reported in
   the replies) and the rest (messaging, process start-up, aggregation). Flower's ClientApp
   seconds per message minus our handlers' seconds is the start-up our app pays inside the
   real deployment (the no-op app's whole ClientApp time is that floor).

3. Simulation (``bench.simulation``; ``--skip-simulation`` leaves it out): s/round of
   ``fedpath simulate`` with 20 sites in Flower's simulation engine (Ray).

The no-op app runs twice: ``no-op`` collects replies as our round loop does (a pull every
0.2 s, ``server.replies``) and is the floor the target is judged against; ``no-op-stock`` uses
Flower's ``send_and_receive`` (a pull every 3 s), which shows what the short poll saves.

How to read it: "ours / no-op" per round is our overhead over Flower's deployment floor. The
no-op round is dominated by the SuperNodes' 3 s polls and process spawns;
ours adds compute and about two ClientApp start-ups per site and round (the sites share the
machine's cores, so their start-ups and training overlap but do not parallelise freely).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.machine import machine
from bench.simulation import report as simulation_report
from bench.simulation import time_simulation
from bench.startup import (
    BY_KEY,
    NOOP_APP,
    ROOT,
    importtime_of,
    measure_startup,
    median,
    print_importtime,
    print_startup,
)
from fedpath.deploy.local_network import LocalNetwork
from fedpath.server.flwr_cli import CONNECTION, NetworkError
from fedpath.server.replies import DEFAULT_POLL_INTERVAL
from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site

CACHE = ROOT / "bench" / "_cache" / "federation"


@dataclass(frozen=True)
class Settings:
    """One benchmark size: the sites, the run, and how often each variant is repeated."""

    name: str
    site: SyntheticSiteSpec
    sites: int
    rounds: int
    local_epochs: int
    runs_per_variant: int
    startup_repeats: int
    run_timeout: float
    """Seconds one deployment run may take before the benchmark gives up."""


FULL = Settings(
    name="full",
    site=SyntheticSiteSpec(n_slides=20, feature_dim=1280, patches=(200, 200)),
    sites=3,
    rounds=3,
    local_epochs=1,
    runs_per_variant=2,
    startup_repeats=5,
    run_timeout=1200.0,
)
QUICK = Settings(
    name="quick",
    site=SyntheticSiteSpec(n_slides=8, feature_dim=64, patches=(30, 30)),
    sites=3,
    rounds=1,
    local_epochs=1,
    runs_per_variant=1,
    startup_repeats=2,
    run_timeout=600.0,
)


# ------------------------------------------------------------------------ deployment


def ensure_sites(settings: Settings) -> dict[str, Path]:
    """The synthetic prepared sites, written once per spec and reused by later runs."""
    key = hashlib.sha256(json.dumps(asdict(settings.site), sort_keys=True).encode()).hexdigest()
    base = CACHE / f"sites-{key[:16]}"
    sites = {}
    for i in range(settings.sites):
        name = f"site_{chr(ord('a') + i)}"
        root = base / name
        if not (root / "done").is_file():
            write_synthetic_site(root, settings.site, seed=i)
            (root / "done").write_text("ok\n")
        sites[name] = root
    return sites


def model_shapes(feature_dim: int) -> list[list[int]]:
    """Shapes of our model's arrays: the no-op app sends the same payload."""
    import torch

    from fedpath.common.mil.models import build_model
    from fedpath.server.config import RunConfig

    model = build_model(RunConfig().model_config_for(feature_dim))
    state: dict[str, torch.Tensor] = model.state_dict()
    return [list(t.shape) for t in state.values()]


@dataclass
class RunResult:
    """One deployment run of one variant."""

    variant: str
    round_seconds: list[float]
    elapsed: float
    clientapp_seconds: float
    messages: int
    traffic_bytes: int
    site_train: list[dict[str, float]] = field(default_factory=list)
    """Per round: site → train handler seconds (ours only)."""
    site_eval: list[dict[str, float]] = field(default_factory=list)
    handler_seconds: float = 0.0
    """Seconds inside our handlers over the whole run (train, evaluate, final test)."""

    def outside_handlers(self) -> float:
        """ClientApp seconds per message not spent in a handler: loading the app, imports."""
        return (self.clientapp_seconds - self.handler_seconds) / self.messages


def wait_nodes(net: LocalNetwork, n: int, timeout: float = 120.0) -> None:
    """Until ``n`` SuperNodes are online; ``NetworkError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while net.connected_nodes() < n:
        if time.monotonic() > deadline:
            raise NetworkError(f"fewer than {n} SuperNodes online after {timeout:.0f} s")
        time.sleep(1.0)


def finish(net: LocalNetwork, run_id: int, timeout: float) -> dict[str, Any]:
    """Wait for the run; its ``flwr ls`` row. ``NetworkError`` if it did not complete."""
    status = net.wait_for_run(run_id, timeout=timeout)
    if status != "finished:completed":
        raise NetworkError(f"run {run_id} ended {status!r}")
    answer = net.flwr("ls", CONNECTION, "--run-id", str(run_id))
    return dict(answer["runs"][0])


def run_ours(
    net: LocalNetwork, settings: Settings, out: Path, tag: str, variant: str = "ours"
) -> RunResult:
    """Our app from the repository root, as a coordinator submits it."""
    run_config = {
        "num-server-rounds": settings.rounds,
        "local-epochs": settings.local_epochs,
        "min-sites": settings.sites,
        "runs-dir": str(out),
        "run-name": tag,
        "round-timeout": settings.run_timeout,
    }
    run_id = net.submit(ROOT, run_config)
    row = finish(net, run_id, settings.run_timeout)
    rounds = [
        json.loads(line) for line in (out / tag / "metrics.jsonl").read_text().splitlines() if line
    ]
    test = json.loads((out / tag / "final.json").read_text())["test"]
    train_eval = [
        m["seconds"] for r in rounds for part in ("train", "evaluate") for m in r[part].values()
    ]
    return RunResult(
        variant=variant,
        round_seconds=[float(r["seconds"]) for r in rounds],
        elapsed=float(row["elapsed"]),
        clientapp_seconds=float(row["compute-time"]["clientapp-seconds"]),
        messages=settings.sites * (2 + 2 * settings.rounds),
        traffic_bytes=int(row["network-traffic"]["total-bytes"]),
        site_train=[{s: float(m["seconds"]) for s, m in r["train"].items()} for r in rounds],
        site_eval=[{s: float(m["seconds"]) for s, m in r["evaluate"].items()} for r in rounds],
        handler_seconds=float(sum(train_eval) + sum(m["seconds"] for m in test.values())),
    )


def run_noop(
    net: LocalNetwork,
    settings: Settings,
    shapes: list[list[int]],
    out: Path,
    tag: str,
    variant: str = "no-op",
) -> RunResult:
    """The no-op app with our message pattern and payload; ``no-op`` collects replies as our
    round loop does (a pull every ``DEFAULT_POLL_INTERVAL`` s), ``no-op-stock`` with Flower's
    ``send_and_receive`` (a pull every 3 s)."""
    out_file = out / f"{tag}.jsonl"
    run_config = {
        "num-server-rounds": settings.rounds,
        "min-sites": settings.sites,
        "shapes": json.dumps(shapes, separators=(",", ":")),
        "round-timeout": settings.run_timeout,
        "reply-poll-interval": DEFAULT_POLL_INTERVAL if variant == "no-op" else 0.0,
        "out-file": str(out_file),
    }
    run_id = net.submit(NOOP_APP, run_config)
    row = finish(net, run_id, settings.run_timeout)
    rounds = [json.loads(line) for line in out_file.read_text().splitlines() if line]
    return RunResult(
        variant=variant,
        round_seconds=[float(r["seconds"]) for r in rounds],
        elapsed=float(row["elapsed"]),
        clientapp_seconds=float(row["compute-time"]["clientapp-seconds"]),
        messages=settings.sites * (2 + 2 * settings.rounds),
        traffic_bytes=int(row["network-traffic"]["total-bytes"]),
    )


VARIANTS = ("ours", "ours-fresh", "no-op", "no-op-stock")
"""Our app with the resident worker (what ``fedpath node`` runs), our app with a fresh process
per message (``--no-resident-worker``), Flower's floor with replies collected as ours are (the
floor the target is judged against), and the same with Flower's own 3 s reply loop."""
NOOP_VARIANTS = ("no-op", "no-op-stock")


def measure_deployment(
    settings: Settings,
    sites: dict[str, Path],
    shapes: list[list[int]],
    progress: Callable[[str], None],
) -> list[RunResult]:
    """Alternate the variants (order rotated every repeat) on two idle-waiting networks: one
    whose SuperNodes use the resident worker (ours, no-op), one whose nodes do not."""
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="fedpath-bench-federation-") as tmp:
        work = Path(tmp)
        with LocalNetwork(work / "net") as warm, LocalNetwork(work / "net-fresh") as fresh:
            nets = {"ours": warm, "ours-fresh": fresh, "no-op": warm, "no-op-stock": warm}
            try:
                for net, worker in ((warm, True), (fresh, False)):
                    net.start_superlink()
                    for name, data in sites.items():
                        net.start_supernode(
                            name, data, extra_node_config={"resident-worker": worker}
                        )
                for net in (warm, fresh):
                    wait_nodes(net, settings.sites)
                for rep in range(settings.runs_per_variant):
                    shift = rep % len(VARIANTS)
                    for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                        tag = f"{variant.replace('-', '')}-{rep}"
                        began = time.perf_counter()
                        net = nets[variant]
                        if variant in NOOP_VARIANTS:
                            result = run_noop(net, settings, shapes, work / "runs", tag, variant)
                        else:
                            result = run_ours(net, settings, work / "runs", tag, variant)
                        results.append(result)
                        progress(
                            f"  {variant:10s} run {rep + 1}: "
                            + ", ".join(f"{s:.1f}" for s in result.round_seconds)
                            + f" s/round; {time.perf_counter() - began:.0f} s to submit and finish"
                        )
            except NetworkError:
                for net in (warm, fresh):
                    for name, tail in net.logs():
                        progress(f"--- {name} log (last lines)\n{tail}")
                raise
    return results


# ------------------------------------------------------------------------ report


def print_deployment(
    settings: Settings, results: list[RunResult], startup: dict[str, float]
) -> None:
    """Per-round table of the variants, each of our variants' round split, and the ratios."""
    by = {v: [r for r in results if r.variant == v] for v in VARIANTS}
    rounds = {v: [s for r in rs for s in r.round_seconds] for v, rs in by.items()}
    print(
        f"\n2. Deployment: {settings.sites} sites on loopback, {settings.rounds} round(s) per run, "
        f"{settings.runs_per_variant} run(s) per variant, rotating order (medians)"
    )
    print(
        f"{'':11s} {'s/round':>8s} {'run wall s':>11s} {'ClientApp s/msg':>16s} "
        f"{'outside handler':>16s} {'MB/run':>7s}  every round"
    )
    for variant, rs in by.items():
        outside = (
            f"{median(r.outside_handlers() for r in rs):16.2f}"
            if variant not in NOOP_VARIANTS
            else " " * 16
        )
        print(
            f"{variant:11s} {median(rounds[variant]):8.2f} "
            f"{median(r.elapsed for r in rs):11.1f} "
            f"{median(r.clientapp_seconds / r.messages for r in rs):16.2f} {outside} "
            f"{median(r.traffic_bytes / 1e6 for r in rs):7.1f}  "
            + " ".join(f"{s:.1f}" for s in rounds[variant])
        )
    for variant in ("ours", "ours-fresh"):
        print(
            f"   {variant} outside handler by run: "
            + ", ".join(f"{r.outside_handlers():.2f}" for r in by[variant])
            + " s/msg (the query's handler time is not reported, so the whole query counts; "
            "on the first run it includes starting the resident workers)"
        )
    print(
        "   ours: resident worker (fedpath node's default); ours-fresh: --no-resident-worker "
        "(every message imports torch and the trainer). ClientApp s/msg: Flower's per-message "
        "ClientApp time (`flwr ls`); outside handler: that minus the seconds our handlers "
        "report (loading the app, imports, the hop to the worker)"
    )
    floor = median(rounds["no-op"])
    stock = median(rounds["no-op-stock"])
    print(
        f"\n   no-op {floor:.2f} s/round: Flower's floor (its SuperNodes' 3 s polls, process "
        f"spawns, payload) with replies pulled every {DEFAULT_POLL_INTERVAL} s as ours are; "
        f"no-op-stock {stock:.2f} s/round with Flower's send_and_receive (a pull every 3 s): "
        f"the short poll saves {stock - floor:.2f} s/round by itself"
    )
    for variant in ("ours", "ours-fresh"):
        rs = by[variant]
        per_round = median(rounds[variant])
        train = median(max(t.values()) for r in rs for t in r.site_train)
        evaluate = median(max(e.values()) for r in rs for e in r.site_eval)
        # Per round and run: round seconds minus the floor minus the slowest site's train
        # handler (local epochs + the validation pass after them): what we add besides training.
        overhead = median(
            s - floor - max(t.values())
            for r in rs
            for s, t in zip(r.round_seconds, r.site_train, strict=True)
        )
        print(
            f"   {variant}: {per_round:.2f} s/round = floor {floor:.2f} + train handler at the "
            f"slowest site {train:.2f} (evaluate handler {evaluate:.2f}) + the rest; overhead "
            f"over the floor excluding local training {overhead:.2f} s/round (target <= 1.5); "
            f"ratio to the floor {per_round / floor:.2f}x per round, "
            f"{median(r.elapsed for r in rs) / median(r.elapsed for r in by['no-op']):.2f}x "
            "whole run"
        )
    startups = startup["train"] + startup["evaluate"] - 2 * startup["noop"]
    print(
        "   (part 1's imports alone: a fresh train + evaluate message pair costs "
        f"{startups:.2f} s over the no-op's, which the resident worker pays once per node)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny sites, 1 round: smoke run")
    parser.add_argument(
        "--skip-deployment", action="store_true", help="only the start-up measurement"
    )
    parser.add_argument(
        "--skip-simulation", action="store_true", help="leave out part 3 (bench.simulation)"
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    print(f"machine: {machine()}")
    spec = settings.site
    print(
        f"settings: {settings.name}; {settings.sites} sites × {spec.n_slides} slides × "
        f"{spec.patches[0]}-{spec.patches[1]} patches × {spec.feature_dim}-d features; "
        f"{settings.rounds} round(s) of {settings.local_epochs} local epoch(s); clam_sb small, "
        "FedMix, no DP"
    )

    times = measure_startup(settings.startup_repeats)
    med = print_startup(times, settings.startup_repeats)
    print_importtime(importtime_of(BY_KEY["train"].code))
    if args.skip_deployment:
        return 0

    started = time.perf_counter()
    sites = ensure_sites(settings)
    shapes = model_shapes(spec.feature_dim)
    n_values = sum(math.prod(s) for s in shapes)
    print(
        f"\nsites ready in {time.perf_counter() - started:.1f} s (cached under {CACHE}); "
        f"model payload {len(shapes)} arrays, {n_values:,} float32 ({n_values * 4 / 1e6:.1f} MB)"
    )
    results = measure_deployment(settings, sites, shapes, progress=lambda s: print(s, flush=True))
    print_deployment(settings, results, med)
    if args.skip_simulation:
        return 0
    sim_sites, sim_rounds = (4, 1) if args.quick else (20, 3)
    print(f"\n3. Simulation: fedpath simulate --sites {sim_sites}, {sim_rounds} round(s)")
    with tempfile.TemporaryDirectory(prefix="fedpath-bench-sim-") as tmp:
        timing = time_simulation(Path(tmp), sim_sites, sim_rounds)
    print("   " + simulation_report(timing))
    return 0 if timing.status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
