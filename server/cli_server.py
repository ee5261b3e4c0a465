"""Coordinator commands of the ``fedpath`` CLI: ``fedpath report RUN_DIR``.

Only wiring and printing: the report itself is ``fedpath.server.report.page.write_report``;
``read_run`` raises ``ConfigError`` for a missing or malformed run directory
(``deploy.cli.main`` turns that into exit code 2). Heavy imports (matplotlib) happen inside
the handler, so building the parser stays fast for every other command.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

EXIT_OK = 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from fedpath.server.run_files import read_run

    run = read_run(args.run_dir)  # a wrong folder is said before matplotlib loads (~1.5 s)
    from fedpath.server.report.content import status_text
    from fedpath.server.report.page import write_report

    page = write_report(run, args.out)
    console.print(status_text(run)[1])
    console.print(f"report: {page}", soft_wrap=True)  # a wrapped path cannot be pasted
    return EXIT_OK


def add_server_commands(sub: Any) -> None:
    """Register the coordinator commands on the top-level subparsers."""
    report = sub.add_parser(
        "report",
        help="render a federated run's HTML report with plots",
        description="Read config.json, metrics.jsonl and final.json of a run directory and "
        "write report.html, one self-contained file that can be mailed on its own (plots of "
        "loss, AUC, aggregation weights and ε embedded, no absolute path of this machine): "
        "what every round did, the privacy guarantee, the settings that applied and the final "
        "test table. Works on a run that is still going or was interrupted.",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    report.add_argument("--out", type=Path, help="folder for report.html (default: RUN_DIR)")
    report.set_defaults(handler=cmd_report)
