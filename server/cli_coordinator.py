"""Coordinator commands: ``fedpath link``, ``fedpath run``, ``fedpath status``.

Thin, safe wrappers over Flower's own tools. ``link`` starts the SuperLink with the settings a
hospital network needs by default (TLS, SuperNode authentication, a state database, runtime
dependency installation off, telemetry off); ``run`` submits this app with ``flwr run`` and
judges the outcome from ``flwr ls`` (``flwr run --stream`` can exit 0 for a failed run);
``status`` lists runs and connected sites. The CLI is the only place that prints or exits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from common.errors import ConfigError

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


def cmd_link(args: argparse.Namespace, console: Console) -> int:
    args.state.mkdir(parents=True, exist_ok=True)
    argv = superlink_argv(args)
    console.print(
        f"SuperLink on {args.host}:{args.port}, state {args.state}; "
        f"TLS {'off' if args.insecure else 'on'}, "
        f"node authentication {'off' if args.no_node_auth else 'on'}"
    )
    if args.print_only:
        console.print(" ".join(argv))
        return EXIT_OK
    sys.stdout.flush()
    from server.local_network import flower_env

    os.execve(argv[0], argv, flower_env())  # the daemon replaces this process (systemd)
    return EXIT_OK  # pragma: no cover - execve does not return


def _cli(args: argparse.Namespace) -> Any:
    from server.local_network import FlwrCli

    ca = None
    if not args.insecure:
        ca = _require_file(args.ca, "--ca", "the CA certificate the coordinator gave you")
    home = Path(args.flwr_home or Path.home() / ".fedpath" / "flwr-home").expanduser()
    cli = FlwrCli(home, args.superlink, ca)
    cli.write_connection()
    return cli


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


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from server.config import RunConfig
    from server.demo_federation import app_directory

    overrides = parse_overrides(args.config_override or [])
    if args.resume:
        overrides["resume"] = str(args.resume)
    RunConfig.from_run_config(overrides, source="-c options")  # fail here, not in the ServerApp
    cli = _cli(args)
    run_id = cli.submit(app_directory(), overrides)
    console.print(f"run {run_id} submitted to {args.superlink}")
    began = time.monotonic()
    last = ""

    def show(status: str) -> None:
        nonlocal last
        if status != last:
            console.print(f"[{time.monotonic() - began:6.0f} s] run {run_id}: {status}")
            last = status

    status = cli.wait_for_run(run_id, args.timeout, poll=5.0, on_poll=show)
    if status != "finished:completed":
        console.print(
            f"[bold red]run {run_id} did not complete ({status})[/]; see `flwr log {run_id}` "
            "and final.json in its run directory on the SuperLink host"
        )
        return EXIT_FAILED
    console.print(f"run {run_id} completed; render its report with `fedpath report RUN_DIR`")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    cli = _cli(args)
    runs = cli.flwr("ls", "local").get("runs") or []
    table = Table(title=f"runs on {args.superlink}")
    for column in ("run id", "status", "elapsed s", "started"):
        table.add_column(column)
    for run in runs:
        table.add_row(
            str(run.get("run-id")),
            str(run.get("status")),
            f"{float(run.get('elapsed') or 0):.0f}",
            str(run.get("running-at") or run.get("pending-at") or ""),
        )
    console.print(table)
    nodes = cli.flwr("supernode", "list", "local").get("nodes") or []
    sites = Table(title="SuperNodes (hospitals)")
    for column in ("node id", "status", "last seen"):
        sites.add_column(column)
    for node in nodes:
        sites.add_row(
            str(node.get("node-id", node.get("node_id", ""))),
            str(node.get("status", "")),
            str(node.get("last-activated-at", node.get("online-until", ""))),
        )
    console.print(sites)
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace, console: Console) -> int:
    from server.simulate import run_simulation, simulation_run_config

    if args.sites < 2:
        raise ConfigError(f"--sites must be at least 2, got {args.sites}")
    run_config = simulation_run_config(args.rounds, args.strategy, args.local_epochs)
    console.print(
        f"simulating {args.sites} synthetic sites in Flower's simulation engine under {args.out}"
    )
    shown = 0

    def progress(rounds: list[dict[str, Any]]) -> None:
        nonlocal shown
        for record in rounds[shown:]:
            weights = list(record["weights"].values())
            console.print(
                f"round {record['round']}: {len(record['replied'])}/{len(record['sampled'])} "
                f"sites, {record['seconds']:.1f} s, weights {min(weights):.3f}–"
                f"{max(weights):.3f}, val AUC {record['global'].get('val_auc') or float('nan'):.3f}"
            )
        shown = len(rounds)

    result = run_simulation(args.out, args.sites, run_config, seed=args.seed, on_poll=progress)
    progress(result.rounds)
    per_round = [r["seconds"] for r in result.rounds]
    if per_round:
        console.print(
            f"{len(per_round)} round(s), median {sorted(per_round)[len(per_round) // 2]:.1f} s "
            f"per round with {args.sites} sites; total {result.seconds:.0f} s"
        )
    console.print(f"run directory: {result.run_dir}")
    if result.status != "finished:completed":
        console.print(f"[bold red]the simulation did not complete ({result.status})[/]")
        return EXIT_FAILED
    return EXIT_OK


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    parser.add_argument("--ca", type=Path, help="CA certificate of the SuperLink (TLS)")
    parser.add_argument("--insecure", action="store_true", help="no TLS (local tests only)")
    parser.add_argument(
        "--flwr-home", type=Path, help="Flower CLI home to use (default ~/.fedpath/flwr-home)"
    )


def add_coordinator_commands(sub: Any) -> None:
    """Register ``link``, ``run`` and ``status``."""
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
    run.add_argument("--timeout", type=float, default=24 * 3600, help="give up after (s)")
    run.set_defaults(handler=cmd_run)

    simulate = sub.add_parser(
        "simulate",
        help="the same apps in Flower's simulation engine, many synthetic sites",
        description="Write N synthetic prepared sites and run one federated run over them "
        "with Flower's simulation engine (Ray) on this machine.",
    )
    simulate.add_argument("--sites", type=int, default=20, help="virtual hospitals (20)")
    simulate.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    simulate.add_argument("--strategy", choices=("fedmix", "fedavg"), default="fedmix")
    simulate.add_argument("--local-epochs", type=int, default=1, help="epochs per round (1)")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--out", type=Path, default=Path("simulation-output"))
    simulate.set_defaults(handler=cmd_simulate)

    status = sub.add_parser("status", help="runs and connected hospitals")
    _connection_options(status)
    status.set_defaults(handler=cmd_status)
