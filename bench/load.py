"""Load benchmark (issue 7.7): many sites, many rounds, and a site with 100,000-patch bags.

Usage (from the repository root)::

    .venv/bin/python -m bench.load             # 20 sites x 10 rounds, and the 100k-patch site
    .venv/bin/python -m bench.load --quick     # 4 sites x 2 rounds, 10k-patch bags: a smoke run

(a) 20 synthetic sites × 10 rounds through the real round loop and ClientApps, in-process,
in a child process: s/round and RSS per round; (b) one round of a site of six 100,000-patch
bags beside a normal site, in a child process: peak RSS overall and per message. Target
(issue 7): everything completes; peak RSS < 2 GB. How and why: ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.machine import machine
from bench.memory import mib, peak_rss, reset_peak_rss

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / "_cache" / "load"
PEAK_TARGET = 2 * 10**9
"""Issue 7's "under 2 GB", in bytes (1,907 MiB)."""

__all__ = [
    "BIG_SITE",
    "PEAK_TARGET",
    "BigSiteResult",
    "ManySitesResult",
    "big_site_round",
    "run_many_sites",
]

BIG_SITE = "site_big"


# ---------------------------------------------------------------------- (a) many sites


@dataclass(frozen=True)
class ManySitesResult:
    """What a many-site run left behind and cost."""

    run_dir: Path
    rounds: list[dict[str, Any]]
    final: dict[str, Any]
    seconds: float
    peak_rss: int
    rss_by_round: dict[int, int]
    """RSS of the process after each round's messages (round number → bytes)."""


def _run_config(runs_dir: Path, run_name: str, rounds: int) -> dict[str, Any]:
    """The simulation's run config (``fedpath simulate``'s), one local epoch per round."""
    return {
        "num-server-rounds": rounds,
        "strategy": "fedmix",
        "local-epochs": 1,
        "split-folds": 3,
        "runs-dir": str(runs_dir),
        "run-name": run_name,
        "connect-timeout": 5.0,
    }


def _forgetful_grid(sites: dict[int, Any]) -> Any:
    """An ``InProcessGrid`` that keeps no copy of the messages (tests' record of them).

    ``InProcessGrid`` keeps every message and reply (the egress test reads them): at 20 sites
    x 10 rounds that is ~800 model copies, which would be measured instead of the round loop.
    Its ``rss_by_round`` holds the process's RSS after each round's messages, so growth from
    round to round (a leak in the loop, the run log or the strategy) shows.
    """
    import psutil
    from flwr.app import Message

    from fedpath.deploy.inprocess_grid import InProcessGrid

    class Forgetful(InProcessGrid):
        def __init__(self) -> None:
            super().__init__(sites)
            self.rss_by_round: dict[int, int] = {}

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            messages = list(messages)
            ids = list(super().push_messages(messages))
            self.sent.clear()
            self.replies.clear()
            groups = {m.metadata.group_id for m in messages}
            rss = psutil.Process().memory_info().rss
            for group in filter(str.isdigit, groups):
                self.rss_by_round[int(group)] = max(self.rss_by_round.get(int(group), 0), rss)
            return ids

    return Forgetful()


def many_sites_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child process: write the sites and run the federation; return what it cost."""
    from fedpath.deploy.inprocess_grid import InProcessSite, task_identity
    from fedpath.deploy.simulate import simulated_site_specs, write_sites
    from fedpath.server.config import RunConfig
    from fedpath.server.federated_run import run_federated

    workdir, n_sites, seed = Path(spec["workdir"]), int(spec["n_sites"]), int(spec["seed"])
    specs = simulated_site_specs(n_sites, seed, int(spec["feature_dim"]))
    sites = write_sites(workdir / "sites", specs, seed)
    grid = _forgetful_grid({100 + i: InProcessSite(p, p.name) for i, p in enumerate(sites)})
    runs = workdir / "runs"
    shutil.rmtree(runs / "many", ignore_errors=True)
    run_config = {**_run_config(runs, "many", int(spec["rounds"])), "min-sites": n_sites}
    cfg = RunConfig.from_run_config(run_config)
    began = time.perf_counter()
    with task_identity():
        run_dir = run_federated(grid, cfg, flwr_run_id=1)
    return {
        "run_dir": str(run_dir),
        "seconds": time.perf_counter() - began,
        "peak_rss": peak_rss(),
        "rss_by_round": grid.rss_by_round,
    }


def run_many_sites(
    workdir: Path, n_sites: int, rounds: int, *, seed: int = 0, feature_dim: int = 64
) -> ManySitesResult:
    """``n_sites`` heterogeneous synthetic sites x ``rounds`` through the real round loop.

    The simulation's small bags (20-80 patches, ``feature_dim``-d): the load here is the
    number of sites and rounds, not the size of a bag. Runs in a child process with one
    intra-op thread, as Ray's actors run (it sets ``OMP_NUM_THREADS=1``): on such tiny bags
    two OpenMP threads on a loaded two-core machine spend their time waiting for each other
    (measured: 5-30 s instead of 0.3-2 s per site and round at load average 12).
    """
    spec = {"workdir": str(workdir), "n_sites": n_sites, "rounds": rounds, "seed": seed}
    out = _in_child("many", {**spec, "feature_dim": feature_dim}, {"OMP_NUM_THREADS": "1"})
    run_dir = Path(out["run_dir"])
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((run_dir / "final.json").read_text())
    rss = {int(k): v for k, v in out["rss_by_round"].items()}
    return ManySitesResult(run_dir, records, final, out["seconds"], out["peak_rss"], rss)


def _in_child(kind: str, spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Run ``kind``'s child function in a fresh interpreter (its own VmHWM); its JSON result."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.load", "--child", kind, json.dumps(spec)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ (b) 100k-patch site


@dataclass(frozen=True)
class BigSiteResult:
    """One round with a big-bag site, measured in a child process."""

    patches_per_bag: int
    n_bags: int
    feature_dim: int
    bag_mib: float
    status: str
    rounds: list[dict[str, Any]]
    final_test: dict[str, dict[str, Any]]
    """``final.json``'s per-site test metrics (the final test is a message of its own)."""
    seconds: float
    peak_rss: int
    """The child's whole peak: coordinator, normal site and big site together."""
    message_peaks: dict[str, int]
    """The big site's message type → peak RSS during it (empty if VmHWM cannot be reset)."""
    baseline_rss: int
    """RSS of the child with torch, the apps and the coordinator loaded, before round one."""


def _measured_grid(sites: dict[int, Any], big_node: int) -> Any:
    """An ``InProcessGrid`` that records the peak RSS of each of ``big_node``'s messages.

    Its ``peaks`` map message type → peak during it; ``whole_peak()`` is the process's peak
    over everything, kept across the VmHWM resets that separate the messages.
    """
    from flwr.app import Message

    from fedpath.deploy.inprocess_grid import InProcessGrid

    class Measured(InProcessGrid):
        def __init__(self) -> None:
            super().__init__(sites)
            self.peaks: dict[str, int] = {}
            self._before_resets = 0

        def whole_peak(self) -> int:
            return max(self._before_resets, peak_rss())

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            ids: list[str] = []
            for message in messages:
                reset = False
                if message.metadata.dst_node_id == big_node:
                    self._before_resets = self.whole_peak()
                    reset = reset_peak_rss()
                ids.extend(super().push_messages([message]))
                if reset:
                    kind = message.metadata.message_type
                    self.peaks[kind] = max(self.peaks.get(kind, 0), peak_rss())
            return ids

    return Measured()


def _write_big_sites(root: Path, patches: int, n_bags: int, feature_dim: int) -> tuple[Path, Path]:
    """The big site (every bag ``patches`` long) and a normal one of the same feature dim.

    Cached: six 100,000-patch bags take a while to write on a busy machine.
    """
    from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site

    big_spec = SyntheticSiteSpec(
        n_slides=n_bags,
        feature_dim=feature_dim,
        patches=(patches, patches),
        tumour_share=0.5,
        annotated_share=0.5,
        splits=(0.4, 0.3),  # of three slides a label: one each for train, val and test
    )
    small_spec = SyntheticSiteSpec(n_slides=10, feature_dim=feature_dim, patches=(20, 80))
    key = f"{patches}x{n_bags}x{feature_dim}"
    big, small = root / key / BIG_SITE, root / key / "site_small"
    if not (big / "site.json").exists():
        shutil.rmtree(big, ignore_errors=True)
        write_synthetic_site(big, big_spec, seed=7)
    if not (small / "site.json").exists():
        shutil.rmtree(small, ignore_errors=True)
        write_synthetic_site(small, small_spec, seed=8)
    return big, small


def big_site_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child process: one federated round over the big and the normal site."""
    import psutil

    from fedpath.deploy.inprocess_grid import InProcessSite, task_identity
    from fedpath.server.config import RunConfig
    from fedpath.server.federated_run import run_federated

    big, small = Path(spec["big"]), Path(spec["small"])
    runs = Path(spec["runs"])
    shutil.rmtree(runs / "big", ignore_errors=True)
    grid = _measured_grid(
        {1: InProcessSite(big, BIG_SITE), 2: InProcessSite(small, "site_small")}, big_node=1
    )
    cfg = RunConfig.from_run_config(_run_config(runs, "big", 1))
    import torch  # noqa: F401 - in the baseline: every ClientApp process imports it

    baseline = psutil.Process().memory_info().rss
    began = time.perf_counter()
    with task_identity():
        run_dir = run_federated(grid, cfg, flwr_run_id=1)
    seconds = time.perf_counter() - began
    final = json.loads((run_dir / "final.json").read_text())
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "status": final["status"],
        "final_test": final["test"],
        "rounds": records,
        "seconds": seconds,
        "peak_rss": grid.whole_peak(),
        "message_peaks": grid.peaks,
        "baseline_rss": baseline,
    }


def big_site_round(
    workdir: Path, *, patches: int = 100_000, n_bags: int = 6, feature_dim: int = 256
) -> BigSiteResult:
    """Write (or reuse) the big site and run its round in a fresh child process."""
    big, small = _write_big_sites(workdir / "sites", patches, n_bags, feature_dim)
    spec = {"big": str(big), "small": str(small), "runs": str(workdir / "runs")}
    out = _in_child("big", spec, {})
    return BigSiteResult(
        patches_per_bag=patches,
        n_bags=n_bags,
        feature_dim=feature_dim,
        bag_mib=patches * feature_dim * 4 / 2**20,
        status=out["status"],
        rounds=out["rounds"],
        final_test=out["final_test"],
        seconds=out["seconds"],
        peak_rss=out["peak_rss"],
        message_peaks=out["message_peaks"],
        baseline_rss=out["baseline_rss"],
    )


# ---------------------------------------------------------------------------------- main


def main(quick: bool, feature_dim: int) -> None:
    print(f"machine: {machine()}")
    n_sites, rounds, patches = (4, 2, 10_000) if quick else (20, 10, 100_000)

    print(f"\n## (a) {n_sites} sites x {rounds} rounds (real round loop, in-process transport)")
    many = run_many_sites(CACHE / "many", n_sites, rounds)
    per_round = sorted(r["seconds"] for r in many.rounds)
    print(
        f"status {many.final['status']}; {len(many.rounds)} rounds; all sites replied in every "
        f"round: {all(len(r['replied']) == n_sites for r in many.rounds)}; "
        f"median {per_round[len(per_round) // 2]:.2f} s/round "
        f"(min {per_round[0]:.2f}, max {per_round[-1]:.2f}); whole run {many.seconds:.1f} s; "
        f"peak RSS {mib(many.peak_rss)}"
    )
    rss = many.rss_by_round
    print("RSS after each round: " + ", ".join(f"{r}: {mib(v)}" for r, v in sorted(rss.items())))

    print(f"\n## (b) a site with 6 bags x {patches:,} patches x {feature_dim}-d, one round")
    big = big_site_round(CACHE / "big", patches=patches, feature_dim=feature_dim)
    (record,) = big.rounds
    train = record["train"][BIG_SITE]
    print(
        f"status {big.status}; bag {big.bag_mib:,.0f} MiB; round {record['seconds']:.1f} s "
        f"(big site's train handler {train['seconds']:.1f} s); whole run {big.seconds:.1f} s"
    )
    print(f"child RSS before round one (torch, apps, coordinator): {mib(big.baseline_rss)}")
    for kind, value in sorted(big.message_peaks.items()):
        print(f"peak RSS during the big site's {kind} messages: {mib(value)}")
    print(f"peak RSS of the child (coordinator + both sites): {mib(big.peak_rss)}")
    verdict = "met" if big.peak_rss < PEAK_TARGET else "MISSED"
    print(f"target: peak < 2 GB ({mib(PEAK_TARGET)}): {verdict}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, not a measurement")
    parser.add_argument("--feature-dim", type=int, default=256, help="of the big site (256)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec = args.child
        run = many_sites_child if kind == "many" else big_site_child
        print(json.dumps(run(json.loads(spec))))
    else:
        main(args.quick, args.feature_dim)
