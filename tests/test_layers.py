"""The layer contracts (pyproject.toml [tool.importlinter]) hold, and do fail on a violation.

CI runs ``scripts/lint_imports.sh`` on the tree as it is; these tests run the same contracts on
a copy with one forbidden import added, so a contract that could never fail would show here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "synthetic", "deploy")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(ROOT / "pyproject.toml")],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )


def _copy(tmp_path: Path) -> Path:
    (tmp_path / "fedpath").mkdir()
    (tmp_path / "fedpath" / "__init__.py").write_text("")
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package,
            tmp_path / "fedpath" / package,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    return tmp_path


def _add_import(tree: Path, module: str, statement: str) -> None:
    path = tree / "fedpath" / Path(*module.split(".")[1:]).with_suffix(".py")
    path.write_text(path.read_text(encoding="utf-8") + f"\n{statement}\n", encoding="utf-8")


@pytest.mark.slow
def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    done = _lint(_copy(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout, done.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "statement", "named"),
    [
        # the hospital side reaching into the coordinator
        (
            "fedpath.client.training.trainer",
            "import fedpath.server.strategies",
            "fedpath.client.training.trainer -> fedpath.server.strategies",
        ),
        # shared code depending on one side
        (
            "fedpath.common.metrics",
            "from fedpath.client import threads",
            "fedpath.common.metrics -> fedpath.client.threads",
        ),
        # the coordinator reaching into the development harness
        (
            "fedpath.server.rounds",
            "import fedpath.deploy.local_network",
            "fedpath.server.rounds -> fedpath.deploy.local_network",
        ),
        # slide reading pulling in torch
        ("fedpath.client.wsi.qc", "import torch", "fedpath.client.wsi.qc -> torch"),
        # synthetic cohorts reaching into the coordinator
        (
            "fedpath.synthetic.site",
            "import fedpath.server.checkpoints",
            "fedpath.synthetic.site -> fedpath.server.checkpoints",
        ),
    ],
)
def test_a_forbidden_import_fails_naming_it(
    tmp_path: Path, module: str, statement: str, named: str
) -> None:
    tree = _copy(tmp_path)
    _add_import(tree, module, statement)
    done = _lint(tree)
    assert done.returncode == 1, done.stdout + done.stderr
    assert named in done.stdout, done.stdout
