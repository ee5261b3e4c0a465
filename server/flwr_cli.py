"""The coordinator's handle on a SuperLink: the ``flwr`` CLI with a private ``FLWR_HOME``.

Runs are submitted with ``flwr run`` and followed by the status the SuperLink lists for them
(what ``flwr ls`` shows, read from its Control API in this process; ``flwr run --stream`` can
exit 0 for a failed run); every call is bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedpath.common.errors import ConfigError, FedpathError
from fedpath.common.flower_env import flower_bin, flower_env, toml_value

__all__ = ["CONNECTION", "FlwrCli", "NetworkError", "app_directory", "app_to_ship"]

CONNECTION = "local"


class NetworkError(FedpathError):
    """A Flower process did not start, or a run did not finish in time."""


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
        connection: dict[str, Any] = {"address": self.address}
        if self.tls_ca is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(Path(self.tls_ca).resolve())
        document = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(document), encoding="utf-8")

    # -- flwr CLI ------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 120.0, cwd: Path | None = None) -> dict[str, Any]:
        """Run a ``flwr`` command with ``--format json``; its parsed answer."""
        argv = [flower_bin("flwr"), *args, "--format", "json"]
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
        argv = [flower_bin("flwr"), "log", str(run_id), CONNECTION, "--show"]
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
        from flwr.proto.control_pb2 import ListNodesRequest

        answer = self._control("list the SuperNodes", "ListNodes", ListNodesRequest())
        return sum(1 for node in answer.nodes_info if node.status.lower() == "online")

    def _control(self, what: str, method: str, request: Any) -> Any:
        """One call to the SuperLink's Control API from this process.

        ``flwr ls`` and ``flwr supernode list`` cost a new interpreter each (about 1.8 s of
        CPU); followers and waits poll them every few seconds for a whole run, which on a
        small coordinator (and in CI) took as much CPU as the federation itself. The same
        HTTP client Flower's CLI builds answers in milliseconds.
        """
        from flwr.cli.typing import SuperLinkConnection
        from flwr.cli.utils import init_http_client_from_connection

        connection = SuperLinkConnection(
            name=CONNECTION,
            address=self.address,
            root_certificates=None if self.tls_ca is None else str(Path(self.tls_ca).resolve()),
            insecure=self.tls_ca is None,
        )
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # "Using SuperLink: ..." banner
                client = init_http_client_from_connection(connection)
            try:
                return getattr(client, method)(request)
            finally:
                client.close()
        except Exception as exc:  # httpx, TLS and Flower's own errors alike: say what failed
            raise NetworkError(
                f"could not {what} on the SuperLink at {self.address}: {type(exc).__name__}: {exc}"
            ) from exc

    def submit(
        self,
        app_dir: Path,
        run_config: Mapping[str, Any],
        federation_config: Mapping[str, Any] | None = None,
    ) -> int:
        """``flwr run APP local -c ...``; the run id. ``federation_config`` sets e.g. the
        number of virtual SuperNodes of a simulation (``num-supernodes``)."""
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        with app_to_ship(Path(app_dir)) as shipped:
            args = ["run", str(shipped), CONNECTION]
            if overrides:
                args += ["--run-config", overrides]
            if federation_config:
                federation = " ".join(f"{k}={toml_value(v)}" for k, v in federation_config.items())
                args += ["--federation-config", federation]
            answer = self.flwr(*args, timeout=300.0, cwd=shipped)
        if not answer.get("success") or "run-id" not in answer:
            raise NetworkError(f"flwr run failed: {answer.get('error-message', answer)}")
        return int(answer["run-id"])

    def run_status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` reports it, e.g. ``finished:completed``."""
        from flwr.proto.control_pb2 import ListRunsRequest

        answer = self._control(f"look up run {run_id}", "ListRuns", ListRunsRequest(run_id=run_id))
        run = answer.run_dict.get(run_id)
        if run is None:
            raise NetworkError(f"the SuperLink at {self.address} knows no run {run_id}")
        status, sub_status = run.status.status, run.status.sub_status
        return f"{status}:{sub_status}" if sub_status else status

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


def app_directory() -> Path:
    """The Flower App to submit: the fedpath source tree (``pyproject.toml`` with the app)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(
            f"{root} has no pyproject.toml: `flwr run` ships the fedpath source directory as "
            "the app, so run the demo from a source checkout (`pip install -e .`)"
        )
    return root


def _components_installed(pyproject: Path) -> bool:
    """Whether the app's ServerApp and ClientApp are modules of the installed fedpath."""
    try:
        config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return False
    components = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    refs = [str(components.get(k, "")) for k in ("serverapp", "clientapp")]
    return all(ref.startswith("fedpath.") for ref in refs)


@contextlib.contextmanager
def app_to_ship(app_dir: Path) -> Iterator[Path]:
    """The folder ``flwr run`` bundles: for fedpath's own app, its ``pyproject.toml`` alone.

    fedpath's ServerApp and ClientApp are loaded from the fedpath package installed on each
    machine (hospitals run the version they installed, never code sent by the coordinator),
    so the bundle needs only the app's configuration. ``flwr run`` on the source tree would
    also walk every file under it (``.venv`` included) to build a bundle nobody imports: about
    10 s per run. Any other app folder is shipped as it is.
    """
    pyproject = app_dir / "pyproject.toml"
    if not _components_installed(pyproject):
        yield app_dir
        return
    with tempfile.TemporaryDirectory(prefix="fedpath-app-") as staged:
        shutil.copyfile(pyproject, Path(staged) / "pyproject.toml")
        yield Path(staged)
