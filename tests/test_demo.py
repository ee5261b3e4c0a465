"""`fedpath demo` end to end on real processes: synthesise, prepare, federate, report, stop.

In a file of its own: pytest-xdist's ``--dist loadfile`` gives this longest test a worker."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from fedpath.deploy.cli import EXIT_OK, main


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.integration
def test_demo_end_to_end_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's first command at small scale: prepare, real Flower processes, report."""
    code, out = _run(
        [
            "demo",
            "--out",
            str(tmp_path),
            "--encoder",
            "tiny_cnn",
            "--rounds",
            "1",
            "--local-epochs",
            "1",
        ],
        capsys,
    )
    assert code == EXIT_OK, out
    assert "prepared hospitals" in out and "time per stage" in out
    assert "held-out test slides" in out and "federated run" in out
    for site in ("site_a", "site_b", "site_c"):
        site_json = json.loads((tmp_path / "prepared" / site / "site.json").read_text())
        assert site_json["slides"]["failed"] == 0 and site_json["patches"] > 0
    final = json.loads((tmp_path / "runs" / "demo" / "final.json").read_text())
    assert final["status"] == "completed"
    assert set(final["test"]) == {"site_a", "site_b", "site_c"}
    assert (tmp_path / "runs" / "demo" / "report.html").is_file()
    # A resident worker runs in its own session and exits within a second or two of seeing
    # its SuperNode gone (longer on a loaded machine): give it a bounded grace, then name it.
    deadline = time.monotonic() + 20.0
    while True:
        leftovers = subprocess.run(
            ["pgrep", "-a", "-f", str(tmp_path)], capture_output=True, text=True, check=False
        ).stdout.strip()
        if not leftovers or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert leftovers == "", f"the demo left processes running:\n{leftovers}"
