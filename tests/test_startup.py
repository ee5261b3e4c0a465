"""Start-up of commands that need no model: they must not import torch, Flower or the modules
of other commands (each costs seconds on a hospital's small VM before anything happens).

Module absence is asserted, not wall time: timings on shared CI machines are noise, while an
``import torch`` that creeps into ``--help`` is exactly what makes it slow everywhere.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from fedpath.deploy.cli import build_parser
from tests.test_patch_only import run_cli_probe

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "flwr")
COMMAND_MODULES = (
    "fedpath.client.cli_local",
    "fedpath.synthetic.cli",
    "fedpath.client.cli_node",
    "fedpath.client.cli_privacy",
    "fedpath.server.cli_server",
    "fedpath.server.cli_security",
    "fedpath.server.cli_link",
    "fedpath.server.cli_run",
    "fedpath.server.cli_status",
    "fedpath.deploy.cli_demo",
    "fedpath.deploy.cli_simulate",
)


def _loaded(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(done.stdout.split())


def test_help_imports_no_torch_flower_or_other_command_modules() -> None:
    rc, heavy, output = run_cli_probe("--help")
    assert rc == 0 and "prepare" in output and "privacy" in output
    assert heavy == [], heavy
    loaded = _loaded(
        "from fedpath.deploy.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert not loaded & {*HEAVY, *COMMAND_MODULES}, sorted(loaded & {*HEAVY, *COMMAND_MODULES})
    assert "rich" not in loaded  # the console is made once a command runs


def test_importing_the_cli_imports_nothing_heavy() -> None:
    loaded = _loaded("import fedpath.deploy.cli")
    assert not loaded & {*HEAVY, *COMMAND_MODULES, "numpy", "pydantic", "rich"}


@pytest.mark.slow
def test_no_model_commands_start_without_torch_or_flower(tmp_path: Path) -> None:
    rc, heavy, output = run_cli_probe("privacy", str(tmp_path))
    assert rc == 2 and "no privacy ledger" in output, output
    assert not set(heavy) & set(HEAVY), heavy
    rc, heavy, output = run_cli_probe("keys", "new", "--out", str(tmp_path / "keys"), "site-a")
    assert rc == 0 and (tmp_path / "keys" / "site-a.pub").is_file(), output
    assert not set(heavy) & set(HEAVY), heavy
    rc, heavy, output = run_cli_probe("encoders")
    assert rc == 0 and "efficientnet_lite0" in output, output
    assert not set(heavy) & set(HEAVY), heavy
    rc, heavy, output = run_cli_probe("report", str(tmp_path))
    assert rc == 2, output
    assert not set(heavy) & {*HEAVY, "matplotlib"}, heavy  # the folder is checked first
    state = tmp_path / "state"
    rc, heavy, output = run_cli_probe(
        "link", "--print-only", "--insecure", "--no-node-auth", "--state", str(state)
    )
    assert rc == 0 and "flower-superlink" in output, output
    assert not set(heavy) & set(HEAVY), heavy
    for command in ("link", "status", "node", "local"):
        rc, heavy, output = run_cli_probe(command, "--help")
        assert rc == 0 and "usage: fedpath" in output, output
        assert not set(heavy) & set(HEAVY), (command, heavy)


def _command_help(parser: argparse.ArgumentParser) -> list[tuple[str, str | None]]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [(action.dest, action.help) for action in sub._choices_actions]


@pytest.mark.slow
def test_the_lazy_command_list_is_the_real_one() -> None:
    """The names and help ``fedpath --help`` lists without importing the command modules are
    the ones those modules register."""
    assert _command_help(build_parser("")) == _command_help(build_parser())
    for command, _ in _command_help(build_parser()):
        assert _command_help(build_parser(command)) == _command_help(build_parser())
