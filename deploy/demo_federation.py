"""The federated part of ``fedpath demo``: real Flower processes on loopback, one FedMix run.

Library code (no printing): the CLI passes callbacks for progress. The network is the same
topology as ``docker-compose.yml`` and a real deployment: one SuperLink, one SuperNode per
hospital whose node config points at that hospital's prepared data, and a coordinator that
submits the app with ``flwr run`` and judges the outcome from ``flwr ls``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpath.deploy.local_network import LocalNetwork
from fedpath.server.flwr_cli import NetworkError, app_directory
from fedpath.server.run_log import FINAL_FILE, read_rounds

__all__ = ["DemoRun", "run_demo_federation"]


@dataclass(frozen=True)
class DemoRun:
    """Outcome of the demo's federated run."""

    status: str
    run_dir: Path
    rounds: list[dict[str, Any]]
    final: dict[str, Any] | None
    seconds: dict[str, float]


def run_demo_federation(
    prepared: Mapping[str, Path],
    workdir: Path,
    run_config: Mapping[str, Any],
    *,
    on_stage: Callable[[str], None] = lambda _: None,
    on_round: Callable[[list[dict[str, Any]]], None] = lambda _: None,
    timeout: float = 1200.0,
    secure: bool = True,
) -> DemoRun:
    """Start a SuperLink and one SuperNode per site, run one federated run, stop everything.

    With ``secure`` (the default, as in a real deployment) a fresh CA, SuperLink certificate
    and one node key pair per hospital are generated, the SuperLink requires TLS and
    registered node keys, and each hospital's public key is registered before its SuperNode
    starts. Every process is stopped on return, on error and on Ctrl-C (the network is a
    context manager).
    """
    seconds: dict[str, float] = {}
    net_dir = workdir / "network"
    shutil.rmtree(net_dir, ignore_errors=True)
    run_name = str(run_config.get("run-name", "demo"))
    runs_dir = Path(str(run_config["runs-dir"]))
    run_dir = runs_dir / run_name
    shutil.rmtree(run_dir, ignore_errors=True)
    began = time.perf_counter()
    with LocalNetwork(net_dir) as net:
        keys: dict[str, Path | None] = dict.fromkeys(prepared)
        public: list[Path] = []
        if secure:
            on_stage("creating TLS certificates and hospital node keys")
            keys, public = _secure(net, list(prepared))
        on_stage("starting the SuperLink")
        net.start_superlink()
        if public:
            on_stage("registering the hospitals' public keys")
            from fedpath.server.security import register_public_keys

            register_public_keys(net.cli, public)
        on_stage(f"starting {len(prepared)} SuperNodes")
        for site, data in prepared.items():
            net.start_supernode(site, data, private_key=keys[site])
        _wait_for_nodes(net, len(prepared), timeout=120.0)
        seconds["start network"] = time.perf_counter() - began
        on_stage("submitting the run (flwr run)")
        started = time.perf_counter()
        run_id = net.submit(app_directory(), run_config)
        seen = -1

        def poll(_: str) -> None:
            nonlocal seen
            rounds = read_rounds(run_dir)
            if len(rounds) != seen:
                seen = len(rounds)
                on_round(rounds)

        status = net.cli.wait_for_run(
            run_id, timeout, poll=2.0, alive=net.processes["superlink"].alive, on_poll=poll
        )
        poll(status)
        seconds["federated run"] = time.perf_counter() - started
    final_path = run_dir / FINAL_FILE
    final = json.loads(final_path.read_text(encoding="utf-8")) if final_path.is_file() else None
    return DemoRun(status, run_dir, read_rounds(run_dir), final, seconds)


def _secure(net: LocalNetwork, sites: list[str]) -> tuple[dict[str, Path | None], list[Path]]:
    """CA + SuperLink certificate + node keys under the network folder; TLS and auth on."""
    from fedpath.server.security import create_certificates, create_node_keys

    pki = create_certificates(net.workdir / "pki", existing="overwrite")
    net.tls_ca, net.tls_cert, net.tls_key = pki.ca_cert, pki.server_cert, pki.server_key
    net.node_auth = True
    pairs = create_node_keys(net.workdir / "keys", sites, existing="overwrite")
    return {p.site: p.private_key for p in pairs}, [p.public_key for p in pairs]


def _wait_for_nodes(net: LocalNetwork, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (connected := net.connected_nodes()) < expected:
        dead = [name for name, m in net.processes.items() if not m.alive()]
        if dead:
            logs = "\n".join(f"--- {n}:\n{t}" for n, t in net.logs() if n in dead)
            raise NetworkError(f"{', '.join(dead)} exited while starting:\n{logs}")
        if time.monotonic() > deadline:
            raise NetworkError(
                f"only {connected} of {expected} SuperNodes connected after {timeout:.0f} s"
            )
        time.sleep(1.0)
