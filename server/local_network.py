"""A real Flower deployment on this machine: one SuperLink and N SuperNodes on loopback.

The demo and the end-to-end tests need exactly what a hospital network runs (the SuperLink,
one SuperNode per hospital, ``flwr run`` submitting the app), only on 127.0.0.1. This module
starts those processes, each in its own process group so the ServerApp/ClientApp children it
spawns are stopped with it, writes a private ``FLWR_HOME`` with the connection, submits runs
and follows them with ``flwr ls --format json`` (``flwr run --stream`` can exit 0 for a failed
run). Every wait is bounded, and ``stop`` (also on exceptions, via the context manager) ends
every process it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from common.errors import FedpathError

__all__ = ["FlwrCli", "LocalNetwork", "NetworkError", "flower_env", "free_port", "toml_value"]

CONNECTION = "local"


class NetworkError(FedpathError):
    """A Flower process did not start, or a run did not finish in time."""


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    """A Python scalar as a TOML value (``flwr run -c`` and ``--node-config`` take TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def flower_env(**extra: str) -> dict[str, str]:
    """Environment for Flower processes: the venv first on PATH, telemetry and update check off.

    The SuperLink and SuperNodes spawn flower-superexec / flwr-serverapp / flwr-clientapp by
    name, so the venv's bin directory must come first on PATH.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", **extra)
    return env


def _bin(name: str) -> str:
    """The Flower executable next to this interpreter (the venv's), else from PATH."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class FlwrCli:
    """The ``flwr`` command against one SuperLink, with its own ``FLWR_HOME``.

    Flower keeps connections in ``$FLWR_HOME/config.toml``; a private home per network (and
    per coordinator command) keeps runs from ever going to a SuperLink the user did not name.
    """

    flwr_home: Path
    address: str
    tls_ca: Path | None = None
    """CA certificate of the SuperLink; ``None`` = insecure (plain HTTP)."""
    workdir: Path | None = None

    def env(self) -> dict[str, str]:
        """Environment of every Flower process: private FLWR_HOME, offline, no telemetry."""
        return flower_env(FLWR_HOME=str(self.flwr_home), PYTHONUNBUFFERED="1")

    def write_connection(self) -> None:
        """``$FLWR_HOME/config.toml`` with one connection, ``local``, to the SuperLink."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
        lines.append(f'address = "{self.address}"')
        if self.tls_ca is None:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {json.dumps(str(Path(self.tls_ca).resolve()))}")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # -- flwr CLI ------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 120.0, cwd: Path | None = None) -> dict[str, Any]:
        """Run a ``flwr`` command with ``--format json``; its parsed answer."""
        argv = [_bin("flwr"), *args, "--format", "json"]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env=self.env(),
                cwd=cwd or self.workdir or Path.cwd(),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise NetworkError(
                f"`flwr {' '.join(args)}` did not answer in {timeout:.0f} s"
            ) from exc
        start = done.stdout.find("{")
        try:
            answer = json.loads(done.stdout[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise NetworkError(
                f"`flwr {' '.join(args)}` gave no JSON answer (exit {done.returncode}): "
                f"{(done.stdout + done.stderr).strip()[-800:]}"
            )
        return answer

    def run_log_text(self, run_id: int, timeout: float = 60.0) -> str:
        """The run's ServerApp log as ``flwr log RUN --show`` prints it (plain text).

        ``flwr log`` has no JSON output; an unreachable SuperLink gives its error text.
        """
        argv = [_bin("flwr"), "log", str(run_id), CONNECTION, "--show"]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env=self.env(),
                cwd=self.workdir or Path.cwd(),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise NetworkError(f"`flwr log {run_id}` did not answer in {timeout:.0f} s") from exc
        return done.stdout + done.stderr

    def stop_run(self, run_id: int) -> None:
        """``flwr stop RUN``: ask the SuperLink to stop the run; ``NetworkError`` if refused."""
        answer = self.flwr("stop", str(run_id), CONNECTION)
        if not answer.get("success"):
            raise NetworkError(
                f"run {run_id} could not be stopped: {answer.get('error-message', answer)}"
            )

    def connected_nodes(self) -> int:
        """How many SuperNodes the SuperLink currently lists as online."""
        answer = self.flwr("supernode", "list", CONNECTION)
        nodes = answer.get("nodes") or []
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def submit(
        self,
        app_dir: Path,
        run_config: Mapping[str, Any],
        federation_config: Mapping[str, Any] | None = None,
    ) -> int:
        """``flwr run APP local -c ...``; the run id. ``federation_config`` sets e.g. the
        number of virtual SuperNodes of a simulation (``num-supernodes``)."""
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        args = ["run", str(app_dir), CONNECTION]
        if overrides:
            args += ["--run-config", overrides]
        if federation_config:
            federation = " ".join(f"{k}={toml_value(v)}" for k, v in federation_config.items())
            args += ["--federation-config", federation]
        answer = self.flwr(*args, timeout=300.0, cwd=app_dir)
        if not answer.get("success") or "run-id" not in answer:
            raise NetworkError(f"flwr run failed: {answer.get('error-message', answer)}")
        return int(answer["run-id"])

    def run_status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` reports it, e.g. ``finished:completed``."""
        answer = self.flwr("ls", CONNECTION, "--run-id", str(run_id))
        runs = answer.get("runs") or []
        if not answer.get("success") or not runs:
            raise NetworkError(f"flwr ls --run-id {run_id}: {answer.get('error-message', answer)}")
        return str(runs[0].get("status", ""))

    def wait_for_run(
        self,
        run_id: int,
        timeout: float,
        poll: float = 3.0,
        alive: Callable[[], bool] | None = None,
        on_poll: Callable[[str], None] | None = None,
    ) -> str:
        """Poll until the run is finished; its final status. ``NetworkError`` on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.run_status(run_id)
            if on_poll is not None:
                on_poll(status)
            if status.startswith("finished"):
                return status
            if alive is not None and not alive():
                raise NetworkError(f"the SuperLink died during run {run_id}")
            if time.monotonic() > deadline:
                raise NetworkError(f"run {run_id} still {status!r} after {timeout:.0f} s")
            time.sleep(poll)


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
    their OpenMP regions from stalling on each other (``client.threads``)."""
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
            _bin("flower-superlink"),
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
        while not _port_open(self.superlink_port):
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
            _bin("flower-supernode"),
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
