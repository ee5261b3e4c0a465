"""``fedpath run`` and ``fedpath stop``: submit a federated run and follow it, or stop one.

Thin, safe wrappers over Flower's own tools: ``run`` submits this app with ``flwr run`` and
judges the outcome from ``flwr ls`` (``flwr run --stream`` can exit 0 for a failed run), showing
progress through :mod:`fedpath.server.cli_run_follower`; ``stop`` asks for ``flwr stop`` and
waits until the SuperLink reports the run finished. The CLI is the only place that prints or
exits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fedpath.common.errors import ConfigError
from fedpath.server.cli_connection import add_connection_options, connect, connection_flags, listed
from fedpath.server.cli_run_follower import RunFollower, explain_outcome, lost_contact

EXIT_OK, EXIT_FAILED = 0, 1


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
    from fedpath.server.config import RunConfig
    from fedpath.server.flwr_cli import NetworkError, app_directory

    overrides = parse_overrides(args.config_override or [])
    if args.resume:
        overrides["resume"] = str(args.resume)
    cfg = RunConfig.from_run_config(overrides, source="-c options")  # fail here, not later
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress reaches a log file as it happens
    cli = connect(args)
    listed(cli, args, "ls")  # reachable, TLS right: say so now, not as "submission failed"
    run_id = cli.submit(app_directory(), overrides)
    console.print(f"run {run_id} submitted to {args.superlink}")
    console.print(f"  stop it with: fedpath stop {run_id} {connection_flags(args)}", soft_wrap=True)
    follower = RunFollower(cli, run_id, cfg.num_server_rounds, console)
    began = time.monotonic()
    last = ""
    while True:
        try:
            status = cli.run_status(run_id)
        except NetworkError as exc:
            return lost_contact(exc, follower, args, console)
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
            console.print(f"follow it: fedpath status {connection_flags(args)}", soft_wrap=True)
            console.print(
                f"stop it:   fedpath stop {run_id} {connection_flags(args)}", soft_wrap=True
            )
            return EXIT_FAILED
        time.sleep(args.poll)
    if status != "finished:completed":
        explain_outcome(status, follower, args, console)
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
    cli = connect(args)
    listed(cli, args, "ls")
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


def add_run_commands(sub: Any) -> None:
    """Register ``run`` and ``stop``."""
    run = sub.add_parser(
        "run",
        help="submit a federated run and follow it",
        description="Submit this app with `flwr run`, follow it, and exit 0 only when "
        "`flwr ls` reports it finished:completed.",
    )
    add_connection_options(run)
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
    add_connection_options(stop)
    stop.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for the run to stop (60)"
    )
    stop.set_defaults(handler=cmd_stop)
