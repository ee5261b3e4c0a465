"""The ``fedpath`` command is where fedpath's log records get a handler (library code only logs)."""

from __future__ import annotations

import argparse
import io
import logging
from typing import Any

import pytest

import fedpath.deploy.cli as cli

LONG_PATH = "/srv/fedpath/runs/" + "a-very-long-run-name-" * 8 + "/final.json"


@pytest.fixture
def logging_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fedpath encoders`` replaced by a command whose library code logs three records."""

    def command(args: argparse.Namespace, console: Any) -> int:
        log = logging.getLogger("fedpath.server.federated_run")
        log.debug("detail")
        log.info(f"report: {LONG_PATH}")
        log.warning("[annotation] tumour_classes is not a markup tag")
        return cli.EXIT_OK

    monkeypatch.setattr(cli, "cmd_encoders", command)


@pytest.mark.usefixtures("logging_command")
def test_records_are_plain_lines_on_stderr_when_it_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fedpath = logging.getLogger("fedpath")
    before = (list(fedpath.handlers), fedpath.level)
    assert cli.main(["encoders"]) == cli.EXIT_OK
    assert capsys.readouterr().err.splitlines() == [
        f"INFO: report: {LONG_PATH}",  # one line, however long: a log file stays greppable
        "WARNING: [annotation] tumour_classes is not a markup tag",
    ]
    assert cli.main(["-v", "encoders"]) == cli.EXIT_OK  # the root's --verbose: debug too
    assert capsys.readouterr().err.splitlines()[0] == "DEBUG: detail"
    assert (fedpath.handlers, fedpath.level) == before, "main leaves no handler behind"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.usefixtures("logging_command")
def test_a_terminal_gets_rich_records(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert cli.main(["encoders"]) == cli.EXIT_OK
    text = terminal.getvalue()
    assert "INFO" in text and "WARNING" in text and "[annotation] tumour_classes" in text
    assert "INFO: " not in text  # rich's level column, not the plain format
