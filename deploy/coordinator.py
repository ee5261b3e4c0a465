"""The compose ``coordinator`` service: register the hospitals' keys, then one federated run.

It does what the demo's coordinator does (``fedpath.deploy.demo_federation``) against a SuperLink it
did not start: wait for the SuperLink, register every hospital's public key, signal that the
keys are in (``--ready-file``: the SuperNodes start only then, so none is refused), wait for
every SuperNode to come online, submit the app with ``flwr run`` and follow it with ``flwr
ls`` (``flwr run --stream`` can exit 0 for a failed run). Exit code 0 only when the run
finished as ``completed``; every wait is bounded.

    python -m fedpath.deploy.coordinator --superlink superlink:9092 --ca /trust/ca.pem --app /app \
        --set num-server-rounds=3 /trust/site_a.pub /trust/site_b.pub
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpath.common.errors import FedpathError
from fedpath.server.flwr_cli import CONNECTION, FlwrCli, NetworkError
from fedpath.server.security import register_public_keys


def parse_setting(text: str) -> tuple[str, Any]:
    """``key=value`` with a TOML value (``rounds=3``, ``runs-dir="/runs"``), as ``flwr -c``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # a bare word is a string, as on flwr's command line
    return key.strip(), parsed


def wait_until(check: Any, what: str, timeout: float, poll: float = 2.0) -> Any:
    """Call ``check`` until it returns a truthy value; ``NetworkError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            result = check()
            if result:
                return result
        except FedpathError as exc:
            last = f": {exc}"
        if time.monotonic() > deadline:
            raise NetworkError(f"gave up waiting for {what} after {timeout:.0f} s{last}")
        time.sleep(poll)


def coordinate(args: argparse.Namespace, cli: FlwrCli) -> str:
    """Register, wait for the nodes, run; the run's final status."""
    from fedpath.server.config import RunConfig

    RunConfig.from_run_config(dict(args.settings), source="--set")  # refuse before any wait
    wait_until(
        lambda: cli.flwr("supernode", "list", CONNECTION).get("success"),
        f"the SuperLink at {args.superlink}",
        args.connect_timeout,
    )
    registered = register_public_keys(cli, args.public_keys, connection=CONNECTION)
    for item in registered:
        state = "already registered" if item.already_registered else f"node id {item.node_id}"
        print(f"registered {item.public_key}: {state}", flush=True)
    if args.ready_file is not None:
        args.ready_file.touch()
    expected = len(args.public_keys)
    wait_until(
        lambda: cli.connected_nodes() >= expected,
        f"{expected} SuperNodes online",
        args.nodes_timeout,
    )
    print(f"{expected} SuperNodes online; submitting {args.app}", flush=True)
    run_id = cli.submit(args.app, dict(args.settings))
    print(f"run {run_id} submitted; following its status on the SuperLink", flush=True)
    status = cli.wait_for_run(run_id, args.run_timeout)
    if status != "finished:completed":
        # Say why where the operator looks (the compose log), not only that it failed.
        lines = [line for line in cli.run_log_text(run_id).splitlines() if "[fedpath]" in line]
        for line in lines[-5:]:
            print(f"ServerApp: {line.split('[fedpath]', 1)[1].strip()}", flush=True)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT")
    parser.add_argument("--ca", type=Path, required=True, help="CA certificate (ca.pem)")
    parser.add_argument("--app", type=Path, required=True, help="the Flower App directory")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        type=parse_setting,
        default=[],
        metavar="KEY=VALUE",
        help="run config override (repeatable)",
    )
    parser.add_argument("--ready-file", type=Path, help="touched once every key is registered")
    parser.add_argument("--connect-timeout", type=float, default=300.0)
    parser.add_argument("--nodes-timeout", type=float, default=3600.0)
    parser.add_argument("--run-timeout", type=float, default=7200.0)
    parser.add_argument("public_keys", nargs="+", type=Path, metavar="SITE.pub")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedpath-coordinator-") as home:
        cli = FlwrCli(Path(home), args.superlink, args.ca)
        cli.write_connection()
        try:
            status = coordinate(args, cli)
        except FedpathError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2
    print(f"run finished: {status}", flush=True)
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
