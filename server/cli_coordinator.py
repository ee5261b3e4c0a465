"""Coordinator commands: ``fedpath link``, ``run``, ``stop``, ``status``.

Thin, safe wrappers over Flower's own tools. ``link`` starts the SuperLink with the settings a
hospital network needs by default (TLS, SuperNode authentication, a state database, runtime
dependency installation off, telemetry off); ``run`` submits this app with ``flwr run`` and
judges the outcome from ``flwr ls`` (``flwr run --stream`` can exit 0 for a failed run);
``status`` lists runs and connected sites. The CLI is the only place that prints or exits.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedpath.common.errors import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_PORT = 9092


def _require_file(path: Path | None, what: str, hint: str) -> Path:
    if path is None:
        raise ConfigError(f"{what} is required ({hint}), or pass --insecure for a local test")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist ({hint})")
    return path


def superlink_argv(args: argparse.Namespace) -> list[str]:
    """The ``flower-superlink`` command line ``fedpath link`` runs (tested directly)."""
    argv = [
        str(Path(sys.executable).with_name("flower-superlink")),
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--database",
        str(args.state / "superlink-state.db"),
        "--disable-runtime-dependency-installation",
    ]
    if args.insecure:
        if not args.no_node_auth:
            raise ConfigError(
                "SuperNode authentication needs TLS: drop --insecure, or add --no-node-auth"
            )
        return [*argv, "--insecure"]
    hint = "create them with `fedpath certs`"
    argv += [
        "--ssl-ca-certfile",
        str(_require_file(args.ca, "--ca", hint)),
        "--ssl-certfile",
        str(_require_file(args.cert, "--cert", hint)),
        "--ssl-keyfile",
        str(_require_file(args.key, "--key", hint)),
    ]
    if not args.no_node_auth:
        argv.append("--enable-supernode-auth")
    return argv


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port another process holds (Flower would end in a traceback)."""
    import errno
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {host} is already in use (another SuperLink, or the "
                    f"previous one still running): stop it, or choose another with --port"
                ) from exc
            raise ConfigError(f"--host {host} --port {port}: cannot listen ({exc})") from exc


def _check_certificates(args: argparse.Namespace, console: Console) -> None:
    """Refuse expired (or not yet valid) TLS files; warn loudly when they expire soon.

    An expired certificate would let the SuperLink start and then fail every hospital's
    handshake with an error that blames the network.
    """
    from fedpath.server.security import EXPIRY_WARNING_DAYS, certificate_problems

    errors, warnings = certificate_problems([args.ca, args.cert])
    if errors:
        raise ConfigError(
            "refusing to start the SuperLink: "
            + "; ".join(errors)
            + ". Issue new files with `fedpath certs` (a new CA: every hospital needs the "
            "new ca.pem)"
        )
    for warning in warnings:
        console.print(
            f"[bold yellow]WARNING: {warning} (< {EXPIRY_WARNING_DAYS} days): hospitals "
            "cannot connect once it has expired; renew it with `fedpath certs` now[/]",
            soft_wrap=True,
        )


def cmd_link(args: argparse.Namespace, console: Console) -> int:
    args.state.mkdir(parents=True, exist_ok=True)
    argv = superlink_argv(args)
    if not args.insecure:
        _check_certificates(args, console)
    if not args.print_only:
        _check_port_free(args.host, args.port)
    console.print(
        f"SuperLink on {args.host}:{args.port}, state {args.state}; "
        f"TLS {'off' if args.insecure else 'on'}, "
        f"node authentication {'off' if args.no_node_auth else 'on'}"
    )
    if args.print_only:
        console.print(" ".join(argv))
        return EXIT_OK
    sys.stdout.flush()
    from fedpath.common.flower_env import flower_env

    os.execve(argv[0], argv, flower_env())  # the daemon replaces this process (systemd)
    return EXIT_OK  # pragma: no cover - execve does not return


FLWR_HOME_ENV = "FEDPATH_FLWR_HOME"
"""Environment variable that moves fedpath's Flower home (default ``~/.fedpath/flwr-home``)."""


def flwr_home(given: Path | None) -> Path:
    """fedpath's own Flower home: ``--flwr-home``, else ``$FEDPATH_FLWR_HOME``, else
    ``~/.fedpath/flwr-home``. It holds the ``local`` connection to the SuperLink named on the
    command line (rewritten by every command) and ``sites.json`` (node id → hospital)."""
    if given is not None:
        return Path(given).expanduser().resolve()
    return (
        Path(os.environ.get(FLWR_HOME_ENV) or Path.home() / ".fedpath" / "flwr-home")
        .expanduser()
        .resolve()
    )


def _cli(args: argparse.Namespace) -> Any:
    from fedpath.server.flwr_cli import FlwrCli

    ca = None
    if not args.insecure:
        ca = _require_file(args.ca, "--ca", "the CA certificate the coordinator gave you")
    cli = FlwrCli(flwr_home(args.flwr_home), args.superlink, ca)
    cli.write_connection()
    return cli


def _connection_flags(args: argparse.Namespace) -> str:
    """The connection options to repeat in a hint, as this command got them (paths made
    absolute, so the hint works from any folder)."""
    flags = f"--superlink {shlex.quote(args.superlink)}"
    if args.insecure:
        flags += " --insecure"
    else:
        flags += f" --ca {shlex.quote(str(Path(args.ca).resolve()))}"
    if args.flwr_home is not None:
        flags += f" --flwr-home {shlex.quote(str(flwr_home(args.flwr_home)))}"
    return flags


def _flwr_log_hint(cli: Any, run_id: int) -> str:
    """A `flwr log` command that works when pasted: fedpath's Flower home, its connection."""
    flwr = Path(sys.executable).with_name("flwr")
    home, flwr_bin = shlex.quote(str(cli.flwr_home)), shlex.quote(str(flwr))
    return f"FLWR_HOME={home} {flwr_bin} log {run_id} local --show"


def _listed(cli: Any, args: argparse.Namespace, *command: str) -> dict[str, Any]:
    """``flwr COMMAND local``; ``NetworkError`` with one line saying why when it fails."""
    from fedpath.server.flwr_cli import NetworkError
    from fedpath.server.security import explain_connection_failure

    answer = cli.flwr(*command, "local", timeout=60.0)
    if not answer.get("success"):
        message = str(answer.get("error-message") or answer)
        raise NetworkError(explain_connection_failure(args.superlink, cli.tls_ca, message))
    return answer


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``-c key=value`` pairs (TOML values) into a dict; ``ConfigError`` on bad syntax."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-c {item!r}: expected key=value")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()  # a bare word: take it as a string
    return out


def round_line(record: dict[str, Any], total: int) -> str:
    """One finished round as ``fedpath run`` prints it (from its ``metrics.jsonl`` line)."""
    glob = record.get("global") or {}
    sampled, replied = record.get("sampled") or [], record.get("replied") or []
    epsilons = [float(p["epsilon"]) for p in (record.get("privacy") or {}).values()]
    client = record.get("client_dp") or {}
    parts = [
        f"round {record.get('round')}/{total}: {len(replied)}/{len(sampled)} sites answered",
        f"train loss {_num(glob.get('train_loss'))}",
        f"val AUC {_num(glob.get('val_auc'))}",
    ]
    if epsilons:
        parts.append(f"slide-level ε so far ≤ {max(epsilons):.2f}")
    if client.get("epsilon") is not None:
        parts.append(f"client-level ε so far {float(client['epsilon']):.2f}")
    if record.get("failed"):
        parts.append(f"failed: {', '.join(sorted(record['failed']))}")
    if record.get("budget_exhausted"):
        parts.append(f"budget exhausted: {', '.join(sorted(record['budget_exhausted']))}")
    return ", ".join(parts)


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


class _RunFollower:
    """What ``fedpath run`` learns while it waits: the run directory and its rounds."""

    def __init__(self, cli: Any, run_id: int, total: int, console: Console) -> None:
        self.cli, self.run_id, self.total, self.console = cli, run_id, total, console
        self.run_dir: Path | None = None
        self.log_text = ""
        self.shown = 0
        self.remote_noted = False

    def refresh_log(self) -> None:
        from fedpath.server.flwr_cli import NetworkError
        from fedpath.server.run_log import RUN_DIR_PREFIX

        try:
            self.log_text = self.cli.run_log_text(self.run_id)
        except NetworkError:
            return
        for line in self.log_text.splitlines():
            _, found, rest = line.partition(f"[fedpath] {RUN_DIR_PREFIX}")
            if found and rest.strip():
                self.run_dir = Path(rest.strip())

    def poll(self) -> None:
        from fedpath.server.run_log import read_rounds

        if self.run_dir is None:
            self.refresh_log()
        if self.run_dir is None:
            return
        if not self.run_dir.is_dir():
            self._poll_log()
            return
        try:
            rounds = read_rounds(self.run_dir)
        except (OSError, ValueError):
            return  # a round line being replaced: read it next time
        for record in rounds[self.shown :]:
            self.console.print(round_line(record, self.total), soft_wrap=True)
        self.shown = max(self.shown, len(rounds))

    def _poll_log(self) -> None:
        """Progress when the run directory is on another machine: the ServerApp's round
        lines (no per-site counts or ε: those are in its metrics.jsonl)."""
        if not self.remote_noted:
            self.console.print(
                f"(the run directory {self.run_dir} is not on this machine: progress from the "
                "ServerApp's log)",
                soft_wrap=True,
            )
            self.remote_noted = True
        self.refresh_log()
        done = self.fedpath_lines(" done in ")
        for line in done[self.shown :]:
            self.console.print(line, soft_wrap=True)
        self.shown = max(self.shown, len(done))

    def fedpath_lines(self, needle: str) -> list[str]:
        marker = "[fedpath] "
        return [
            line.split(marker, 1)[1].strip()
            for line in self.log_text.splitlines()
            if marker in line and needle in line
        ]


def _final_record(run_dir: Path | None) -> dict[str, Any] | None:
    import json

    from fedpath.server.run_log import FINAL_FILE

    if run_dir is None or not (run_dir / FINAL_FILE).is_file():
        return None
    try:
        data = json.loads((run_dir / FINAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _explain_outcome(
    status: str, follower: _RunFollower, args: argparse.Namespace, console: Console
) -> None:
    """Why a run did not complete, from its final.json, else from the ServerApp's log."""
    follower.refresh_log()
    follower.poll()
    run_id, run_dir = follower.run_id, follower.run_dir
    final = _final_record(run_dir)
    reason = (final or {}).get("reason")
    if not reason:
        failed = follower.fedpath_lines("run failed")
        reason = failed[-1] if failed else None
    if not reason and status == "finished:stopped":
        reason = "stopped on request (`fedpath stop` or `flwr stop`)"
    rounds = (final or {}).get("rounds_completed", follower.shown)
    console.print(
        f"[bold red]run {run_id} did not complete ({status}) after {rounds} round(s)[/]",
        soft_wrap=True,
    )
    console.print(
        f"reason: {reason or 'not recorded by the ServerApp (see its log below)'}", soft_wrap=True
    )
    if run_dir is not None:
        console.print(f"run directory (on the SuperLink host): {run_dir}", soft_wrap=True)
    resumable = run_dir is not None and (
        (run_dir / "config.json").is_file() or int(rounds or 0) > 0
    )
    if resumable:
        console.print(
            f"continue it: fedpath run {_connection_flags(args)} "
            f"--resume {shlex.quote(str(run_dir))}",
            soft_wrap=True,
        )
    console.print(f"ServerApp log: {_flwr_log_hint(follower.cli, run_id)}", soft_wrap=True)


def _lost_contact(
    exc: Exception, follower: _RunFollower, args: argparse.Namespace, console: Console
) -> int:
    """The SuperLink stopped answering while a run was followed: say what is known."""
    from fedpath.server.security import explain_connection_failure

    reason = explain_connection_failure(args.superlink, follower.cli.tls_ca, str(exc))
    console.print(
        f"[bold red]lost contact while following run {follower.run_id}:[/] {reason}",
        soft_wrap=True,
    )
    console.print(
        f"the run may still be going: fedpath status {_connection_flags(args)}", soft_wrap=True
    )
    if follower.run_dir is not None:
        console.print(
            f"if the SuperLink restarted, continue it: fedpath run {_connection_flags(args)} "
            f"--resume {shlex.quote(str(follower.run_dir))}",
            soft_wrap=True,
        )
    return EXIT_FAILED


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from fedpath.server.config import RunConfig
    from fedpath.server.flwr_cli import NetworkError, app_directory

    overrides = parse_overrides(args.config_override or [])
    if args.resume:
        overrides["resume"] = str(args.resume)
    cfg = RunConfig.from_run_config(overrides, source="-c options")  # fail here, not later
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress reaches a log file as it happens
    cli = _cli(args)
    _listed(cli, args, "ls")  # reachable, TLS right: say so now, not as "submission failed"
    run_id = cli.submit(app_directory(), overrides)
    console.print(f"run {run_id} submitted to {args.superlink}")
    console.print(
        f"  stop it with: fedpath stop {run_id} {_connection_flags(args)}", soft_wrap=True
    )
    follower = _RunFollower(cli, run_id, cfg.num_server_rounds, console)
    began = time.monotonic()
    last = ""
    while True:
        try:
            status = cli.run_status(run_id)
        except NetworkError as exc:
            return _lost_contact(exc, follower, args, console)
        if status != last:
            console.print(f"[{time.monotonic() - began:6.0f} s] run {run_id}: {status}")
            last = status
        follower.poll()
        if status.startswith("finished"):
            break
        if time.monotonic() - began > args.timeout:
            console.print(
                f"[bold yellow]stopped following run {run_id} after {args.timeout:.0f} s "
                f"(--timeout); the run goes on on the SuperLink ({status}).[/]",
                soft_wrap=True,
            )
            console.print(f"follow it: fedpath status {_connection_flags(args)}", soft_wrap=True)
            console.print(
                f"stop it:   fedpath stop {run_id} {_connection_flags(args)}", soft_wrap=True
            )
            return EXIT_FAILED
        time.sleep(args.poll)
    if status != "finished:completed":
        _explain_outcome(status, follower, args, console)
        return EXIT_FAILED
    follower.refresh_log()
    reports = follower.fedpath_lines("report: ")
    console.print(f"run {run_id} completed", soft_wrap=True)
    if follower.run_dir is not None:
        console.print(f"run directory (on the SuperLink host): {follower.run_dir}", soft_wrap=True)
    if reports:
        console.print(reports[-1], soft_wrap=True)
    else:
        console.print(
            "the report was not rendered: fedpath report RUN_DIR writes it", soft_wrap=True
        )
    return EXIT_OK


def cmd_stop(args: argparse.Namespace, console: Console) -> int:
    cli = _cli(args)
    _listed(cli, args, "ls")
    status = cli.run_status(args.run_id)
    if status.startswith("finished"):
        console.print(f"run {args.run_id} has already finished ({status}); nothing to stop")
        return EXIT_FAILED
    cli.stop_run(args.run_id)
    deadline = time.monotonic() + args.wait
    while not (status := cli.run_status(args.run_id)).startswith("finished"):
        if time.monotonic() > deadline:
            console.print(
                f"[bold red]run {args.run_id} was asked to stop but is still {status} after "
                f"{args.wait:.0f} s[/]; check again with `fedpath status`",
                soft_wrap=True,
            )
            return EXIT_FAILED
        time.sleep(1.0)
    console.print(f"run {args.run_id} stopped ({status})")
    return EXIT_OK


def _last_seen(node: dict[str, Any]) -> str:
    """When the SuperLink last heard from a node, as Flower records it."""
    status = str(node.get("status", ""))
    online_at, offline_at = node.get("online-at"), node.get("offline-at")
    if status == "online":
        return f"now (online since {online_at})" if online_at and online_at != "N/A" else "now"
    if offline_at and offline_at != "N/A":
        return str(offline_at)
    return "never connected"


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    from fedpath.server.flwr_cli import NetworkError
    from fedpath.server.security import read_site_names

    cli = _cli(args)
    try:
        runs = _listed(cli, args, "ls").get("runs") or []
        nodes = _listed(cli, args, "supernode", "list").get("nodes") or []
    except NetworkError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return EXIT_FAILED
    table = Table(title=f"runs on {args.superlink}")
    # Ids are what `fedpath stop` takes: never truncated to "48265369…".
    table.add_column("run id", no_wrap=True, min_width=20)
    table.add_column("status", no_wrap=True, min_width=18)
    for column in ("elapsed s", "started"):
        table.add_column(column)
    for run in runs:
        table.add_row(
            str(run.get("run-id")),
            str(run.get("status")),
            f"{float(run.get('elapsed') or 0):.0f}",
            str(run.get("running-at") or run.get("pending-at") or ""),
        )
    console.print(table)
    for run in runs:  # Flower's own word on runs that did not complete
        details = run.get("status-details")
        if details and details != "N/A" and run.get("status") != "finished:completed":
            console.print(
                f"run {run.get('run-id')} ({run.get('status')}): {details}", soft_wrap=True
            )
    names = read_site_names(cli.flwr_home, args.superlink)
    sites = Table(title="SuperNodes (hospitals)")
    sites.add_column("site")
    sites.add_column("node id", no_wrap=True, min_width=20)
    for column in ("status", "last seen"):
        sites.add_column(column)
    for node in nodes:
        node_id = str(node.get("node-id", ""))
        entry = names.get(int(node_id)) if node_id.isdigit() else None
        sites.add_row(
            entry["site"] if entry else "?",
            node_id,
            str(node.get("status", "")),
            _last_seen(node),
        )
    console.print(sites)
    if any(
        not str(n.get("node-id", "")).isdigit() or int(n["node-id"]) not in names for n in nodes
    ):
        console.print(
            f"? = a node id whose key was not registered with `fedpath keys register` using "
            f"this Flower home ({cli.flwr_home})",
            soft_wrap=True,
        )
    return EXIT_OK


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    parser.add_argument("--ca", type=Path, help="CA certificate of the SuperLink (TLS)")
    parser.add_argument("--insecure", action="store_true", help="no TLS (local tests only)")
    add_flwr_home_option(parser)


def add_flwr_home_option(parser: argparse.ArgumentParser) -> None:
    """``--flwr-home``: the same option on every command that talks to the SuperLink."""
    parser.add_argument(
        "--flwr-home",
        type=Path,
        help=f"fedpath's Flower home: the connection it writes for `flwr` and the node id → "
        f"site names of `fedpath keys register` (default ${FLWR_HOME_ENV}, else "
        "~/.fedpath/flwr-home)",
    )


def add_coordinator_commands(sub: Any) -> None:
    """Register ``link``, ``run``, ``stop`` and ``status``."""
    link = sub.add_parser(
        "link",
        help="run the SuperLink (coordinator)",
        description="Start the Flower SuperLink with TLS, SuperNode authentication and a state "
        "database on; runtime dependency installation and telemetry off.",
    )
    link.add_argument("--state", type=Path, required=True, help="folder for the state database")
    link.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (127.0.0.1). The one port serves the Fleet API and the "
        "unauthenticated Control API (flwr run/stop/ls): expose it to hospitals through "
        "deploy/nginx/fedpath-superlink.conf, which passes only the Fleet API, or pass "
        "--host 0.0.0.0 on a network only the coordinator and the hospitals share",
    )
    link.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port ({DEFAULT_PORT})")
    link.add_argument("--ca", type=Path, help="CA certificate (from `fedpath certs`)")
    link.add_argument("--cert", type=Path, help="SuperLink certificate")
    link.add_argument("--key", type=Path, help="SuperLink private key")
    link.add_argument("--insecure", action="store_true", help="no TLS (local tests only)")
    link.add_argument(
        "--no-node-auth", action="store_true", help="accept SuperNodes without registered keys"
    )
    link.add_argument("--print-only", action="store_true", help="print the command, do not run")
    link.set_defaults(handler=cmd_link)

    run = sub.add_parser(
        "run",
        help="submit a federated run and follow it",
        description="Submit this app with `flwr run`, follow it, and exit 0 only when "
        "`flwr ls` reports it finished:completed.",
    )
    _connection_options(run)
    run.add_argument(
        "-c",
        dest="config_override",
        action="append",
        metavar="KEY=VALUE",
        help="run setting (see [tool.flwr.app.config]); repeatable",
    )
    run.add_argument("--resume", type=Path, help="run directory to continue (on the SuperLink)")
    run.add_argument(
        "--timeout",
        type=float,
        default=24 * 3600,
        help="stop following the run after this many seconds (it goes on; see `fedpath stop`)",
    )
    run.add_argument("--poll", type=float, default=5.0, help=argparse.SUPPRESS)
    run.set_defaults(handler=cmd_run)

    stop = sub.add_parser(
        "stop",
        help="stop a federated run on the SuperLink",
        description="Ask the SuperLink to stop RUN (`flwr stop`) and wait until it reports "
        "the run finished. Its run directory keeps the rounds done: `fedpath run --resume "
        "RUN_DIR` continues it.",
    )
    stop.add_argument("run_id", type=int, metavar="RUN", help="run id (`fedpath status`)")
    _connection_options(stop)
    stop.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for the run to stop (60)"
    )
    stop.set_defaults(handler=cmd_stop)

    status = sub.add_parser(
        "status",
        help="runs and connected hospitals",
        description="List the SuperLink's runs and SuperNodes: each hospital by the name "
        "`fedpath keys register` recorded, its status and when it was last seen. Exit code 1 "
        "with one line saying why when the SuperLink cannot be reached or TLS fails.",
    )
    _connection_options(status)
    status.set_defaults(handler=cmd_status)
