"""``fedpath certs`` and ``fedpath keys new|register``: the files a secure deployment needs.

Only wiring and printing; the work is in ``fedpath.server.security``, which raises. Why ``keys`` has
sub-commands instead of ``fedpath keys --out DIR SITE...`` plus ``fedpath keys register``:
with one positional list of sites, a hospital named ``register`` would be ambiguous, and the
two steps run on different machines (the hospital makes its pair, the coordinator registers
the public halves), so each gets its own verb and help page.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


def _existing(args: argparse.Namespace) -> str:
    if args.overwrite:
        return "overwrite"
    return "keep" if args.keep_existing else "refuse"


def _add_existing_options(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--keep-existing",
        action="store_true",
        help=f"keep {what} that already exist and fit, create the missing ones (for init jobs)",
    )
    group.add_argument(
        "--overwrite", action="store_true", help=f"replace existing {what} (see the warning)"
    )


def _refused(exc: Exception, console: Console) -> int:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    console.print("Pass --keep-existing to keep them or --overwrite to replace them.")
    return EXIT_USAGE


def cmd_certs(args: argparse.Namespace, console: Console) -> int:
    from cryptography import x509

    from fedpath.server.security import (
        KeyExistsError,
        certificate_sans,
        certificate_validity,
        create_certificates,
    )

    try:
        files = create_certificates(args.out, args.san, existing=_existing(args))
    except KeyExistsError as exc:
        return _refused(exc, console)
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    state = "created" if files.created else "kept (already there and valid)"
    console.print(f"TLS files {state} in {args.out}:")
    console.print(f"  CA certificate   {files.ca_cert}   → every hospital and the coordinator")
    console.print(f"  CA key           {files.ca_key}   → keep offline; never deploy it")
    console.print(f"  SuperLink cert   {files.server_cert}")
    console.print(f"  SuperLink key    {files.server_key}")
    console.print(f"  valid for: {', '.join(sorted(certificate_sans(cert)))}", soft_wrap=True)
    for label, path in (("CA", files.ca_cert), ("SuperLink", files.server_cert)):
        validity = certificate_validity(path)
        colour = "green" if validity.usable and validity.days_left >= 30 else "bold red"
        console.print(f"  {label:<10} [{colour}]{validity.describe()}[/]", soft_wrap=True)
    if files.created and args.overwrite:
        console.print(
            "[yellow]A new CA was made: every hospital needs the new ca.pem before it can "
            "connect again.[/]"
        )
    return EXIT_OK


def cmd_keys_new(args: argparse.Namespace, console: Console) -> int:
    from fedpath.server.security import KeyExistsError, create_node_keys, public_key_fingerprint

    try:
        pairs = create_node_keys(args.out, args.sites, existing=_existing(args))
    except KeyExistsError as exc:
        return _refused(exc, console)
    for pair in pairs:
        console.print(f"[bold]{pair.site}[/]: {'created' if pair.created else 'kept'}")
        console.print(f"  private  {pair.private_key}  (stays at the hospital)", soft_wrap=True)
        console.print(
            f"  public   {pair.public_key}  {public_key_fingerprint(pair.public_key)}",
            soft_wrap=True,
        )
    console.print(
        "Send each .pub file to the coordinator (`fedpath keys register`); compare the "
        "SHA256 fingerprint with them over another channel."
    )
    if args.overwrite and any(p.created for p in pairs):
        console.print(
            "[yellow]Replaced keys are new node identities: register them again; the old "
            "registrations no longer match any hospital.[/]"
        )
    return EXIT_OK


def cmd_keys_register(args: argparse.Namespace, console: Console) -> int:
    """Register the keys and remember which node id is which hospital (for `status`)."""
    from fedpath.server.cli_connection import flwr_home
    from fedpath.server.flwr_cli import CONNECTION, FlwrCli
    from fedpath.server.security import (
        RegistrationError,
        explain_connection_failure,
        key_site_name,
        public_key_fingerprint,
        read_site_names,
        record_site_names,
        register_public_keys,
    )

    if not args.ca.is_file():
        console.print(f"[bold red]error:[/] --ca {args.ca} does not exist", soft_wrap=True)
        return EXIT_USAGE
    cli = FlwrCli(flwr_home(args.flwr_home), args.superlink, args.ca)
    cli.write_connection()
    answer = cli.flwr("supernode", "list", CONNECTION, timeout=args.timeout)
    if not answer.get("success"):
        reason = explain_connection_failure(
            args.superlink, args.ca, str(answer.get("error-message") or answer)
        )
        console.print(f"[bold red]error:[/] {reason}; no key was registered", soft_wrap=True)
        return EXIT_PARTIAL
    try:
        done = register_public_keys(
            cli, args.public_keys, connection=CONNECTION, timeout=args.timeout
        )
        failures: dict[Path, str] = {}
    except RegistrationError as exc:
        done, failures = exc.registered, exc.failures
    record_site_names(cli.flwr_home, args.superlink, done)
    known = {
        e["fingerprint"]: node for node, e in read_site_names(cli.flwr_home, args.superlink).items()
    }
    for item in done:
        site = key_site_name(item.public_key)
        if item.already_registered:
            node = known.get(public_key_fingerprint(item.public_key))
            what = "already registered" + (f" (node id {node})" if node is not None else "")
        else:
            what = f"node id {item.node_id}"
        console.print(f"[green]ok[/]     {site} {item.public_key}: {what}", soft_wrap=True)
    for path, reason in failures.items():
        console.print(f"[bold red]failed[/] {path}: {reason}", soft_wrap=True)
    if failures:
        console.print(f"{len(failures)} of {len(done) + len(failures)} key(s) not registered.")
        return EXIT_PARTIAL
    return EXIT_OK


def add_security_commands(sub: Any) -> None:
    """Register ``certs`` and ``keys new|register`` on the top-level subparsers."""
    certs = sub.add_parser(
        "certs",
        help="make a CA and the SuperLink's TLS certificate",
        description="Write ca.pem/ca.key (a private CA) and superlink.pem/superlink.key (the "
        "SuperLink's certificate, signed by the CA) into --out. The certificate names "
        "localhost, 127.0.0.1 and ::1 (the SuperLink's own processes connect on loopback) "
        "plus every --san. Existing files are never replaced unless asked: hospitals trust "
        "this CA. Private keys are written with mode 0600.",
    )
    certs.add_argument("--out", type=Path, required=True, help="folder for the four files")
    certs.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="host name or IP hospitals use to reach the SuperLink (repeatable)",
    )
    _add_existing_options(certs, "TLS files")
    certs.set_defaults(handler=cmd_certs)

    keys = sub.add_parser("keys", help="SuperNode key pairs: make them, register them")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    new = keys_sub.add_parser(
        "new",
        help="make one key pair per hospital",
        description="Write SITE.key (OpenSSH EC P-384 private key, mode 0600: the hospital's "
        "SuperNode identity, --auth-supernode-private-key) and SITE.pub (what the "
        "coordinator registers) for each SITE. A key keeps its node id across restarts; a "
        "new key is a new node, so existing keys are never replaced unless asked.",
    )
    new.add_argument("--out", type=Path, required=True, help="folder for the key files")
    new.add_argument("sites", nargs="+", metavar="SITE", help="hospital (site) names")
    _add_existing_options(new, "key pairs")
    new.set_defaults(handler=cmd_keys_new)

    register = keys_sub.add_parser(
        "register",
        help="register hospitals' public keys with the SuperLink",
        description="Run `flwr supernode register` for each public key against the SuperLink "
        "at --superlink over TLS (verified with --ca). With node authentication on, only "
        "registered keys can connect. Every key is tried; keys registered before count as "
        "done; the ones that fail are listed with Flower's reason (exit code 1). Which node id is "
        "which hospital (the key's fedpath-SITE comment, else its file name) is kept in "
        "fedpath's Flower home for `fedpath status`. A SuperLink that cannot be reached, or a "
        "--ca that does not verify its certificate, is named before any key is tried.",
    )
    register.add_argument("--superlink", required=True, metavar="HOST:PORT")
    register.add_argument(
        "--ca", type=Path, required=True, help="CA certificate the SuperLink's cert chains to"
    )
    register.add_argument("public_keys", nargs="+", type=Path, metavar="KEY.pub")
    register.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per key before giving up (60)"
    )
    from fedpath.server.cli_connection import add_flwr_home_option

    add_flwr_home_option(register)
    register.set_defaults(handler=cmd_keys_register)
