"""``fedpath status``: the SuperLink's runs and its SuperNodes, each named by its hospital.

Run ids are shown whole (``fedpath stop`` takes them) and every node by the site name that
``fedpath keys register`` recorded in the Flower home. Read-only, so a command of its own beside
``run`` and ``stop``, which change what the SuperLink does.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedpath.server.cli_connection import add_connection_options, connect, listed

EXIT_OK, EXIT_FAILED = 0, 1


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

    cli = connect(args)
    try:
        runs = listed(cli, args, "ls").get("runs") or []
        nodes = listed(cli, args, "supernode", "list").get("nodes") or []
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


def add_status_command(sub: Any) -> None:
    """Register ``status``."""
    status = sub.add_parser(
        "status",
        help="runs and connected hospitals",
        description="List the SuperLink's runs and SuperNodes: each hospital by the name "
        "`fedpath keys register` recorded, its status and when it was last seen. Exit code 1 "
        "with one line saying why when the SuperLink cannot be reached or TLS fails.",
    )
    add_connection_options(status)
    status.set_defaults(handler=cmd_status)
