"""``fedpath node``: the hospital daemon (a Flower SuperNode pointed at the prepared data).

It refuses to start when something a run would trip over later is missing: the data directory
is not prepared, or the TLS CA / node key files are absent. Each refusal says what to run. The
SuperNode then replaces this process (``execve``), so systemd supervises Flower directly.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path
from typing import Any

from filelock import lock_descriptor
from rich.console import Console

from fedpath.common.errors import ConfigError

EXIT_OK = 0


def supernode_argv(args: argparse.Namespace) -> list[str]:
    """Validate the hospital's setup and build the ``flower-supernode`` command line."""
    from fedpath.client.prepare.records import INDEX_FILE, SITE_FILE
    from fedpath.common.flower_env import toml_value

    data: Path = args.data.expanduser().resolve()
    for name in (SITE_FILE, INDEX_FILE):
        if not (data / name).is_file():
            raise ConfigError(
                f"{data} is not a prepared data directory ({name} is missing): run "
                f"`fedpath prepare --manifest slides.csv --out {data}` first"
            )
    site = args.site or data.name
    node_config: dict[str, Any] = {
        "data-path": str(data),
        "site": site,
        "resident-worker": not getattr(args, "no_resident_worker", False),
    }
    threads = getattr(args, "torch_threads", None)
    if threads is not None:
        from fedpath.client.threads import NODE_THREADS_KEY, node_torch_threads

        node_config[NODE_THREADS_KEY] = node_torch_threads({NODE_THREADS_KEY: threads})
    device = getattr(args, "device", None)
    if device is not None:
        node_config["device"] = check_node_device(device)
    budget = getattr(args, "privacy_budget", None)
    delta = getattr(args, "privacy_delta", None)
    if budget is not None or delta is not None:
        from fedpath.client.privacy_ledger import NodeBudget

        extra = {"privacy-budget": budget, "privacy-delta": delta}
        NodeBudget.from_node_config(extra)  # refuse a bad budget now, not at round 1
        node_config.update({k: v for k, v in extra.items() if v is not None})
    argv = [
        str(Path(sys.executable).with_name("flower-supernode")),
        "--superlink",
        args.superlink,
        "--port",
        str(args.port),
        "--node-config",
        " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items()),
    ]
    if args.insecure:
        return [*argv, "--insecure"]
    for flag, path, hint in (
        ("--ca", args.ca, "the CA certificate the coordinator sends you"),
        ("--key", args.key, "create it with `fedpath keys new --out DIR SITE` and send the .pub"),
    ):
        if path is None:
            raise ConfigError(f"{flag} is required ({hint}); --insecure only for local tests")
        if not Path(path).is_file():
            raise ConfigError(f"{flag} {path} does not exist ({hint})")
    return [
        *argv,
        "--root-certificates",
        str(args.ca),
        "--auth-supernode-private-key",
        str(args.key),
    ]


def check_node_device(name: str) -> str:
    """The node's ``--device``, spelling checked and, when it names a GPU, present here.

    Refused now rather than at round 1, where the hospital would see only an error reply in
    the coordinator's log. ``auto`` and ``cpu`` are always there and need no torch import
    (this command starts fast); a GPU name is resolved by torch (``DeviceError`` if absent).
    """
    from fedpath.client.node_device import NODE_DEVICE_KEY, node_device_name

    wanted = node_device_name({NODE_DEVICE_KEY: name})
    if wanted not in ("auto", "cpu"):
        from fedpath.common.device import resolve_device

        resolve_device(wanted)
    return wanted


def device_label(name: str) -> str:
    """What the journal shows for the node's ``--device``: the GPU by name when one is named
    (``cuda:1 (NVIDIA L40S)``), else the setting (``auto`` is resolved per message)."""
    wanted = check_node_device(name)
    if wanted in ("auto", "cpu"):
        return "the CPU" if wanted == "cpu" else "auto (a GPU when torch sees one, else the CPU)"
    from fedpath.common.device import describe_device, resolve_device

    return describe_device(resolve_device(wanted))


def check_port_free(port: int) -> None:
    """Refuse a local API port another process holds (the SuperNode would die in a traceback).

    The SuperNode serves its ClientApp API on 127.0.0.1:PORT, binding with SO_REUSEADDR as
    uvicorn does, so a port in TIME_WAIT is not mistaken for a port in use.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError(f"--port {port}: cannot be used ({exc.strerror})") from exc
            raise ConfigError(
                f"port {port} on 127.0.0.1 is already in use (another `fedpath node` on this "
                f"machine, or the previous one still running): stop that one, or give this "
                f"node its own local port, e.g. --port {port + 1}"
            ) from exc


def check_tls(superlink: str, ca: Path, console: Console) -> None:
    """Refuse an expired CA or one the SuperLink's certificate does not verify with.

    Without this the SuperNode retries for ever and logs only "connection unavailable". A
    SuperLink that does not answer yet is no reason to refuse: the daemon waits for it.
    """
    from fedpath.common.tls import EXPIRY_WARNING_DAYS, certificate_problems, diagnose_tls

    errors, warnings = certificate_problems([ca])
    for warning in warnings:
        console.print(
            f"[bold yellow]WARNING: {warning} (< {EXPIRY_WARNING_DAYS} days): ask the "
            "coordinator for the renewed ca.pem[/]",
            soft_wrap=True,
        )
    cause = errors[0] if errors else diagnose_tls(superlink, ca)
    if cause is not None:
        raise ConfigError(
            f"TLS to the SuperLink at {superlink} cannot work: {cause}. Ask the coordinator "
            "for the current ca.pem"
        )


def lock_node_key(key: Path) -> int:
    """Hold an exclusive lock on the node key for the SuperNode's lifetime; the fd.

    One key is one node: the SuperLink refuses a second SuperNode with a key that is online,
    but only with "Failed to activate SuperNode", the same words it uses for an unregistered
    key. On one machine the lock tells the two apart before anything starts. The lock is
    ``filelock``'s on a descriptor this function owns (the key is locked in place, never
    opened for writing): the fd stays open through ``execve``, so the lock lives exactly as
    long as the SuperNode.
    """
    fd = os.open(key, os.O_RDONLY)
    if not lock_descriptor(fd, blocking=False):
        os.close(fd)
        raise ConfigError(
            f"--key {key} is already used by another `fedpath node` running on this machine: "
            "one SuperNode per key (the SuperLink refuses a second node with a key that is "
            "connected); stop the other one, or give this hospital its own key "
            "(`fedpath keys new`, then `fedpath keys register` at the coordinator)"
        )
    os.set_inheritable(fd, True)
    return fd


def cmd_node(args: argparse.Namespace, console: Console) -> int:
    argv = supernode_argv(args)
    console.print(f"SuperNode for {args.site or args.data.name} → {args.superlink}")
    if getattr(args, "device", None):
        console.print(f"training and evaluation on {device_label(args.device)}")
    if args.print_only:
        console.print(" ".join(argv))
        return EXIT_OK
    check_port_free(args.port)
    if not args.insecure:
        check_tls(args.superlink, Path(args.ca), console)
        lock_node_key(Path(args.key))
    from fedpath.common.flower_env import flower_env

    sys.stdout.flush()
    os.execve(argv[0], argv, flower_env())
    return EXIT_OK  # pragma: no cover - execve does not return


def add_node_command(sub: Any) -> None:
    node = sub.add_parser(
        "node",
        help="run this hospital's SuperNode (the federated client daemon)",
        description="Start a Flower SuperNode whose ClientApp trains on the prepared data in "
        "--data. Only model parameters and aggregate metrics leave this machine.",
    )
    node.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    node.add_argument("--data", type=Path, required=True, help="prepared data directory")
    node.add_argument("--key", type=Path, help="this hospital's private node key")
    node.add_argument("--ca", type=Path, help="CA certificate of the SuperLink")
    node.add_argument("--site", help="site name shown to the coordinator (default: folder name)")
    node.add_argument("--port", type=int, default=9094, help="local ClientApp API port (9094)")
    node.add_argument("--insecure", action="store_true", help="no TLS (local tests only)")
    node.add_argument(
        "--privacy-budget",
        type=float,
        help="lifetime slide-level ε this data may spend over all runs (rounds beyond it are "
        "not trained; `fedpath privacy DATA_DIR` shows what is spent)",
    )
    node.add_argument(
        "--privacy-delta", type=float, help="δ at which the lifetime budget is counted"
    )
    node.add_argument(
        "--no-resident-worker",
        action="store_true",
        help="run every message's training in its own fresh process (slower: torch is "
        "imported again for each message) instead of this node's resident worker",
    )
    node.add_argument(
        "--torch-threads",
        type=int,
        help="intra-op threads for training and evaluation (default: every core; set it when "
        "several nodes or other heavy jobs share this machine)",
    )
    node.add_argument(
        "--device",
        help="where this hospital trains and evaluates: auto | cpu | cuda | cuda:N | mps "
        "(default auto: a GPU when torch sees one, else the CPU); the server cannot choose it",
    )
    node.add_argument("--print-only", action="store_true", help="print the command, do not run")
    node.set_defaults(handler=cmd_node)
