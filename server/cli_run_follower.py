"""What ``fedpath run`` shows while it waits on a run, and how it explains the end.

Round lines come from the run directory's ``metrics.jsonl`` when the SuperLink host's folder is
visible here, else from the ServerApp's log; a run that did not complete is explained from its
``final.json`` or that log, with the command that continues it. Apart from the commands: they
submit and poll, this reads the run's records and words them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from fedpath.server.cli_connection import connection_flags

EXIT_FAILED = 1


def _flwr_log_hint(cli: Any, run_id: int) -> str:
    """A `flwr log` command that works when pasted: fedpath's Flower home, its connection."""
    flwr = Path(sys.executable).with_name("flwr")
    home, flwr_bin = shlex.quote(str(cli.flwr_home)), shlex.quote(str(flwr))
    return f"FLWR_HOME={home} {flwr_bin} log {run_id} local --show"


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


class RunFollower:
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


def explain_outcome(
    status: str, follower: RunFollower, args: argparse.Namespace, console: Console
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
            f"continue it: fedpath run {connection_flags(args)} "
            f"--resume {shlex.quote(str(run_dir))}",
            soft_wrap=True,
        )
    console.print(f"ServerApp log: {_flwr_log_hint(follower.cli, run_id)}", soft_wrap=True)


def lost_contact(
    exc: Exception, follower: RunFollower, args: argparse.Namespace, console: Console
) -> int:
    """The SuperLink stopped answering while a run was followed: say what is known."""
    from fedpath.server.security import explain_connection_failure

    reason = explain_connection_failure(args.superlink, follower.cli.tls_ca, str(exc))
    console.print(
        f"[bold red]lost contact while following run {follower.run_id}:[/] {reason}",
        soft_wrap=True,
    )
    console.print(
        f"the run may still be going: fedpath status {connection_flags(args)}", soft_wrap=True
    )
    if follower.run_dir is not None:
        console.print(
            f"if the SuperLink restarted, continue it: fedpath run {connection_flags(args)} "
            f"--resume {shlex.quote(str(follower.run_dir))}",
            soft_wrap=True,
        )
    return EXIT_FAILED
