"""``fedpath privacy DATA_DIR``: what the privacy ledger says was spent on this data.

Printing only: the numbers come from :func:`fedpath.client.privacy_ledger.summarise`. The ledger's
secret (the seed of the rounds' noise) is never shown.
"""

from __future__ import annotations

import argparse
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

EXIT_OK = 0


def _eps(value: float | None) -> str:
    if value is None:
        return "–"
    return "∞" if math.isinf(value) else f"{value:.3f}"


def _day(recorded: str) -> str:
    """The UTC day of an ISO timestamp (the ledger keeps the full time)."""
    try:
        return datetime.fromisoformat(recorded).astimezone(UTC).date().isoformat()
    except ValueError:
        return recorded


def cmd_privacy(args: argparse.Namespace, console: Console) -> int:
    from fedpath.client.privacy_ledger import LEDGER_FILE, LIFETIME_ACCOUNTANT, summarise

    data: Path = args.data.expanduser()
    datasets = summarise(data)
    console.print(f"privacy ledger: {data / LEDGER_FILE}  (privacy unit: one slide)")
    for d in datasets:
        table = Table(title=f"dataset {d.dataset_id} ({d.n_slides} slides, since {d.first_seen})")
        # At 80 columns every column was cut to "run-3f9…", "hospita…", "2026-1…": the run
        # key (what ties a line to the coordinator's run) and the date are kept whole.
        width = max([len("run"), *(len(r.run) for r in d.runs)])
        table.add_column("run", no_wrap=True, min_width=width)
        table.add_column("site", overflow="fold")
        table.add_column("rounds", justify="right")
        table.add_column("ε", justify="right", no_wrap=True)
        table.add_column("δ", no_wrap=True)
        table.add_column("acct.", no_wrap=True)
        table.add_column("last (UTC)", no_wrap=True, min_width=10)
        for r in d.runs:
            table.add_row(
                r.run,
                r.site,
                str(r.rounds),
                _eps(r.epsilon),
                f"{r.delta:g}",
                r.accountant.upper(),
                _day(r.last_recorded),
            )
        console.print(table)
        for r in d.runs:
            if r.releases != r.rounds:
                console.print(
                    f"  run {r.run}: {r.releases} releases in {r.rounds} rounds (a round asked "
                    "again with another model is a new release; ε counts every release)"
                )
        delta = "–" if d.lifetime_delta is None else f"{d.lifetime_delta:g}"
        budget = "none set" if d.budget_epsilon is None else f"{d.budget_epsilon:g}"
        console.print(
            f"lifetime ε = {_eps(d.lifetime_epsilon)} at δ = {delta} "
            f"({LIFETIME_ACCOUNTANT.upper()} over every run on these slides); budget: {budget}; "
            f"left: {_eps(d.budget_left)}"
        )
        if d.shares_slides_with:
            console.print(
                "  shares slides with dataset(s) " + ", ".join(d.shares_slides_with) + ": "
                "their rounds count towards this lifetime ε"
            )
    if not datasets:
        console.print("the ledger records no dataset yet")
    return EXIT_OK


def add_privacy_command(sub: Any) -> None:
    privacy = sub.add_parser(
        "privacy",
        help="summarise the privacy ledger of a prepared data directory",
        description="Per dataset and run: rounds trained with slide-level DP-SGD, ε and δ "
        "spent, the lifetime ε over all runs and what is left of the budget "
        "(privacy-budget in the node config).",
    )
    privacy.add_argument("data", type=Path, metavar="DATA_DIR", help="prepared data directory")
    privacy.set_defaults(handler=cmd_privacy)
