"""Simulation benchmark: seconds per round of ``fedpath simulate`` with 20 sites (issue 5).

Usage (from the repository root)::

    .venv/bin/python -m bench.simulation               # 20 sites x 3 rounds, a few minutes
    .venv/bin/python -m bench.simulation --sites 4 --rounds 2   # smoke test

The same ServerApp and ClientApp as a deployment, in Flower's simulation engine (Ray), on the
heterogeneous synthetic feature-bag sites ``fedpath simulate`` writes (8-40 slides each,
20-80 patches a bag). Prints each round's seconds, the median, and the whole run's wall time
including Ray's start. ``bench.federation`` runs this as its part (3).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedpath.deploy.simulate import run_simulation, simulation_run_config


@dataclass(frozen=True)
class SimulationTiming:
    sites: int
    status: str
    round_seconds: list[float]
    wall_seconds: float

    @property
    def median(self) -> float:
        return statistics.median(self.round_seconds) if self.round_seconds else float("nan")


def time_simulation(workdir: Path, sites: int, rounds: int, seed: int = 0) -> SimulationTiming:
    """One simulated FedMix run; the rounds' own ``seconds`` from metrics.jsonl."""
    result = run_simulation(workdir, sites, simulation_run_config(rounds), seed=seed)
    seconds = [float(r["seconds"]) for r in result.rounds]
    return SimulationTiming(sites, result.status, seconds, result.seconds)


def report(timing: SimulationTiming) -> str:
    per_round = ", ".join(f"{s:.1f}" for s in timing.round_seconds) or "none"
    return (
        f"simulation, {timing.sites} sites (Ray): {timing.status}; s/round {per_round}; "
        f"median {timing.median:.1f} s/round; whole run {timing.wall_seconds:.0f} s "
        f"(Ray start included); load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedpath-bench-sim-") as tmp:
        timing = time_simulation(Path(tmp), args.sites, args.rounds)
    print(report(timing))
    return 0 if timing.status == "finished:completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
