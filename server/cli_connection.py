"""How the coordinator's commands reach the SuperLink: options, Flower home, ``flwr`` calls.

``run``, ``stop`` and ``status`` take the same connection options and talk to the SuperLink
through fedpath's own Flower home (``keys register`` writes its site names there too). Kept in
one place so that a hint printed by one command repeats the options exactly as the others parse
them, and every command fails on an unreachable SuperLink with the same one line.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import Any

from fedpath.common.errors import ConfigError


def require_file(path: Path | None, what: str, hint: str) -> Path:
    """A TLS file the command needs: ``ConfigError`` naming the option if it is missing."""
    if path is None:
        raise ConfigError(f"{what} is required ({hint}), or pass --insecure for a local test")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist ({hint})")
    return path


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


def connect(args: argparse.Namespace) -> Any:
    """A ``FlwrCli`` for the SuperLink on the command line, its connection written."""
    from fedpath.server.flwr_cli import FlwrCli

    ca = None
    if not args.insecure:
        ca = require_file(args.ca, "--ca", "the CA certificate the coordinator gave you")
    cli = FlwrCli(flwr_home(args.flwr_home), args.superlink, ca)
    cli.write_connection()
    return cli


def connection_flags(args: argparse.Namespace) -> str:
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


def listed(cli: Any, args: argparse.Namespace, *command: str) -> dict[str, Any]:
    """``flwr COMMAND local``; ``NetworkError`` with one line saying why when it fails."""
    from fedpath.server.flwr_cli import NetworkError
    from fedpath.server.security import explain_connection_failure

    answer = cli.flwr(*command, "local", timeout=60.0)
    if not answer.get("success"):
        message = str(answer.get("error-message") or answer)
        raise NetworkError(explain_connection_failure(args.superlink, cli.tls_ca, message))
    return answer


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """``--superlink``, ``--ca``, ``--insecure`` and ``--flwr-home``."""
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
