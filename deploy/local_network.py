"""A real Flower deployment on this machine: one SuperLink and N SuperNodes on loopback.

The demo and the end-to-end tests need exactly what a hospital network runs (the SuperLink,
one SuperNode per hospital, ``flwr run`` submitting the app), only on 127.0.0.1. This module
starts those processes, each in its own process group so the ServerApp/ClientApp children it
spawns are stopped with it, writes a private ``FLWR_HOME`` with the connection, submits runs
and follows them by the status the SuperLink lists (``server/flwr_cli.py``; ``flwr run
--stream`` can exit 0 for a failed run). Every wait is bounded, and ``stop`` (also on
exceptions, via the context manager) ends every process it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fedpath.common.flower_env import flower_bin, free_port, port_open, toml_value
from fedpath.server.flwr_cli import FlwrCli, NetworkError

__all__ = ["LocalNetwork", "Managed"]


@dataclass
class Managed:
    """One started process and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 15) -> str:
        self.log_file.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class LocalNetwork:
    """SuperLink + SuperNodes under ``workdir``; use as a context manager."""

    workdir: Path
    superlink_port: int = field(default_factory=free_port)
    tls_ca: Path | None = None
    """CA certificate: TLS on when set (with ``tls_cert``/``tls_key`` for the SuperLink)."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    node_auth: bool = False
    simulation: bool = False
    """Run Flower's simulation engine (Ray) inside the SuperLink instead of real SuperNodes."""
    torch_threads_per_node: int = 1
    """Every node here shares this machine's cores: one intra-op thread each by default keeps
    their OpenMP regions from stalling on each other (``fedpath.client.threads``)."""
    processes: dict[str, Managed] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Processes run with the network folder as their cwd: every path handed to them
        # (state database, certificates, keys, data) must be absolute.
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr-home"
        self.flwr_home.mkdir(exist_ok=True)

    # -- environment ---------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    def env(self) -> dict[str, str]:
        return self.cli.env()

    def write_connection(self) -> None:
        self.cli.write_connection()

    def _tls_args(self, server: bool) -> list[str]:
        if self.tls_ca is None:
            return ["--insecure"]
        ca = str(Path(self.tls_ca).resolve())
        if server:
            if self.tls_cert is None or self.tls_key is None:
                raise NetworkError("TLS needs the SuperLink's certificate and key")
            return [
                "--ssl-ca-certfile",
                ca,
                "--ssl-certfile",
                str(Path(self.tls_cert).resolve()),
                "--ssl-keyfile",
                str(Path(self.tls_key).resolve()),
            ]
        return ["--root-certificates", ca]

    # -- processes -----------------------------------------------------------------------

    def _spawn(self, name: str, argv: Sequence[str]) -> Managed:
        if name in self.processes and self.processes[name].alive():
            raise NetworkError(f"{name} is already running")
        log_path = self.workdir / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        process = subprocess.Popen(
            list(argv),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            cwd=self.workdir,
            start_new_session=True,
        )
        managed = Managed(name, process, log_path, log_file)
        self.processes[name] = managed
        return managed

    def start_superlink(self, timeout: float = 60.0) -> None:
        """Start the SuperLink with a state database; return once its port accepts."""
        argv = [
            flower_bin("flower-superlink"),
            *self._tls_args(server=True),
            "--port",
            str(self.superlink_port),
            "--database",
            str(self.workdir / "superlink-state.db"),
            "--disable-runtime-dependency-installation",
        ]
        if self.node_auth:
            argv.append("--enable-supernode-auth")
        if self.simulation:
            argv.append("--simulation")
        managed = self._spawn("superlink", argv)
        self.write_connection()
        deadline = time.monotonic() + timeout
        while not port_open(self.superlink_port):
            if not managed.alive():
                raise NetworkError(f"the SuperLink exited at start:\n{managed.tail()}")
            if time.monotonic() > deadline:
                raise NetworkError(f"the SuperLink did not open port {self.superlink_port}")
            time.sleep(0.2)

    def start_supernode(
        self,
        site: str,
        data_dir: Path,
        *,
        port: int | None = None,
        private_key: Path | None = None,
        extra_node_config: Mapping[str, Any] | None = None,
        superlink: str | None = None,
    ) -> None:
        """One hospital: a SuperNode whose node config points at its prepared data.

        ``superlink`` is the HOST:PORT the node dials instead of the SuperLink itself, e.g. a
        reverse proxy in front of it (the Fleet API is all a hospital should reach).
        """
        node_config = {
            "data-path": str(Path(data_dir).resolve()),
            "site": site,
            "resident-worker": True,
            "torch-threads": self.torch_threads_per_node,
            **(extra_node_config or {}),
        }
        argv = [
            flower_bin("flower-supernode"),
            *self._tls_args(server=False),
            "--superlink",
            superlink or self.address,
            "--port",
            str(port or free_port()),
            "--node-config",
            " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items()),
        ]
        if private_key is not None:
            argv += ["--auth-supernode-private-key", str(Path(private_key).resolve())]
        self._spawn(f"node-{site}", argv)

    def stop_process(self, name: str, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds; close its log."""
        managed = self.processes.pop(name, None)
        if managed is None:
            return
        if managed.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(managed.process.pid, signal.SIGTERM)
            try:
                managed.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(managed.process.pid, signal.SIGKILL)
                managed.process.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):  # children left in the group
            os.killpg(managed.process.pid, signal.SIGKILL)
        managed.log_file.close()

    def stop(self) -> None:
        """Stop SuperNodes first, then the SuperLink (the order Flower recommends)."""
        for name in sorted(self.processes, key=lambda n: n == "superlink"):
            self.stop_process(name)

    def __enter__(self) -> LocalNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- flwr CLI (delegated) ----------------------------------------------------------

    @property
    def cli(self) -> FlwrCli:
        return FlwrCli(self.flwr_home, self.address, self.tls_ca, workdir=self.workdir)

    def flwr(self, *args: str, timeout: float = 120.0, cwd: Path | None = None) -> dict[str, Any]:
        return self.cli.flwr(*args, timeout=timeout, cwd=cwd)

    def connected_nodes(self) -> int:
        return self.cli.connected_nodes()

    def submit(
        self,
        app_dir: Path,
        run_config: Mapping[str, Any],
        federation_config: Mapping[str, Any] | None = None,
    ) -> int:
        return self.cli.submit(app_dir, run_config, federation_config)

    def run_status(self, run_id: int) -> str:
        return self.cli.run_status(run_id)

    def wait_for_run(self, run_id: int, timeout: float, poll: float = 3.0) -> str:
        """Poll until the run is finished; ``NetworkError`` on timeout or a dead SuperLink."""
        superlink = self.processes.get("superlink")
        return self.cli.wait_for_run(
            run_id, timeout, poll, alive=(superlink.alive if superlink else None)
        )

    def logs(self) -> Iterator[tuple[str, str]]:
        """(process name, last lines of its log) for error messages."""
        for name, managed in self.processes.items():
            yield name, managed.tail()
