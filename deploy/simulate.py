"""``fedpath simulate``: the same ServerApp and ClientApp in Flower's simulation engine (Ray).

For questions a three-hospital demo cannot answer (how do FedMix weights behave with 20+
sites of very different sizes? how long does a round take?) without 20 machines. Each virtual
SuperNode ``i`` trains on a prepared site ``site_<i>`` of synthetic feature bags (the same
files ``fedpath prepare`` writes), with its own size, tumour share, annotation share and
"stain" shift. A SuperLink is started in simulation mode with runtime dependency installation
off (otherwise every run would try to install the app's dependencies from the network).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpath.common.atomic import atomic_write_text
from fedpath.deploy.local_network import LocalNetwork
from fedpath.server.flwr_cli import NetworkError, app_directory
from fedpath.server.run_log import FINAL_FILE, read_rounds
from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site

__all__ = ["SimulationResult", "run_simulation", "simulated_site_specs", "simulation_run_config"]


@dataclass(frozen=True)
class SimulationResult:
    status: str
    run_dir: Path
    rounds: list[dict[str, Any]]
    seconds: float
    reason: str | None = None
    """Why a run that did not complete stopped: its final.json, else the ServerApp's log."""
    server_log: Path | None = None
    """The ServerApp's log of a run that did not complete, kept under the work folder (the
    simulation's SuperLink is gone when the command returns, and ``flwr log`` with it)."""


SERVER_LOG = "serverapp.log"


def failure_reason(run_dir: Path, log_text: str) -> str | None:
    """The reason final.json records, else the ServerApp's last "run failed" line, else its
    last error line: the run may fail before it writes any file (a refused run config)."""
    try:
        final = json.loads((run_dir / FINAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        final = None
    if isinstance(final, dict) and final.get("reason"):
        return str(final["reason"])
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    failed = [line.split("[fedpath] ", 1)[1] for line in lines if "[fedpath] run failed" in line]
    if failed:
        return failed[-1]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return errors[-1] if errors else None


def simulation_run_config(
    rounds: int, strategy: str = "fedmix", local_epochs: int = 1
) -> dict[str, Any]:
    """The run config of ``fedpath simulate`` (also what ``bench/federation.py`` times).

    Three folds because the smallest simulated sites hold 8 slides; a long round timeout
    because Ray on a small machine can take minutes per round at 20+ sites.
    """
    return {
        "num-server-rounds": rounds,
        "strategy": strategy,
        "local-epochs": local_epochs,
        "split-folds": 3,
        "round-timeout": 1800.0,
    }


def simulated_site_specs(n_sites: int, seed: int, feature_dim: int) -> list[SyntheticSiteSpec]:
    """Heterogeneous sites: sizes 8–40 slides, tumour share 0.3–0.7, some with annotations."""
    rng = np.random.default_rng(seed)
    specs = []
    for _ in range(n_sites):
        specs.append(
            SyntheticSiteSpec(
                n_slides=int(rng.integers(8, 41)),
                feature_dim=feature_dim,
                patches=(20, 80),
                tumour_share=float(rng.uniform(0.3, 0.7)),
                annotated_share=float(rng.choice([0.0, 0.0, 0.3])),
                site_shift=float(rng.uniform(0.2, 1.0)),
            )
        )
    return specs


def write_sites(root: Path, specs: list[SyntheticSiteSpec], seed: int) -> list[Path]:
    shutil.rmtree(root, ignore_errors=True)
    return [write_synthetic_site(root / f"site_{i:03d}", s, seed + i) for i, s in enumerate(specs)]


def run_simulation(
    workdir: Path,
    n_sites: int,
    run_config: dict[str, Any],
    *,
    seed: int = 0,
    feature_dim: int = 64,
    timeout: float = 3600.0,
    on_poll: Callable[[list[dict[str, Any]]], None] = lambda _: None,
) -> SimulationResult:
    """Write ``n_sites`` synthetic sites and run one federated run over them in simulation."""
    data = workdir / "sites"
    write_sites(data, simulated_site_specs(n_sites, seed, feature_dim), seed)
    runs_dir = (workdir / "runs").resolve()
    run_name = str(run_config.get("run-name") or "simulation")
    shutil.rmtree(runs_dir / run_name, ignore_errors=True)
    config = {
        **run_config,
        "simulation-data": str(data.resolve()),
        "runs-dir": str(runs_dir),
        "run-name": run_name,
        "min-sites": n_sites,
    }
    began = time.perf_counter()
    network = workdir / "network"
    shutil.rmtree(network, ignore_errors=True)
    with LocalNetwork(network, simulation=True) as net:
        net.start_superlink()
        run_id = net.submit(app_directory(), config, {"num-supernodes": n_sites})
        status = net.cli.wait_for_run(
            run_id,
            timeout,
            poll=2.0,
            alive=net.processes["superlink"].alive,
            on_poll=lambda _: on_poll(read_rounds(runs_dir / run_name)),
        )
        log_text = ""
        if status != "finished:completed":
            try:
                log_text = net.cli.run_log_text(run_id)
            except NetworkError as exc:
                log_text = f"`flwr log {run_id}` failed: {exc}"
    rounds = read_rounds(runs_dir / run_name)
    seconds = time.perf_counter() - began
    if status == "finished:completed":
        return SimulationResult(status, runs_dir / run_name, rounds, seconds)
    server_log = workdir / SERVER_LOG
    atomic_write_text(server_log, log_text)
    reason = failure_reason(runs_dir / run_name, log_text)
    return SimulationResult(status, runs_dir / run_name, rounds, seconds, reason, server_log)
