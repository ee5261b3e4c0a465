"""``fedpath link``: start the SuperLink with the settings a hospital network needs.

TLS, SuperNode authentication, a state database, runtime dependency installation off and
telemetry off by default; expired certificates and a taken port are refused before Flower starts
(it would end in a traceback, or in every hospital's handshake failing). A module of its own:
it starts the daemon, while the other coordinator commands are clients of it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from fedpath.common.errors import ConfigError
from fedpath.server.cli_connection import require_file

EXIT_OK = 0
DEFAULT_PORT = 9092


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
        str(require_file(args.ca, "--ca", hint)),
        "--ssl-certfile",
        str(require_file(args.cert, "--cert", hint)),
        "--ssl-keyfile",
        str(require_file(args.key, "--key", hint)),
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


def add_link_command(sub: Any) -> None:
    """Register ``link``."""
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
