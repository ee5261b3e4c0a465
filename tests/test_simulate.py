"""`fedpath simulate`: the same ServerApp/ClientApp in Flower's simulation engine (Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpath.deploy.cli import main
from fedpath.deploy.simulate import simulated_site_specs

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_site_specs_are_heterogeneous_and_deterministic() -> None:
    a = simulated_site_specs(20, seed=1, feature_dim=32)
    assert a == simulated_site_specs(20, seed=1, feature_dim=32)
    sizes = {s.n_slides for s in a}
    assert len(sizes) > 5 and min(sizes) >= 8 and max(sizes) <= 40


def test_simulation_of_four_sites_completes(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    code = main(["simulate", "--sites", "4", "--rounds", "1", "--out", str(out)])
    assert code == 0
    run_dir = out / "runs" / "simulation"
    (record,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(record["replied"]) == [f"site_{i:03d}" for i in range(4)]
    assert sum(record["weights"].values()) == pytest.approx(1.0)
    assert json.loads((run_dir / "final.json").read_text())["status"] == "completed"
    assert not (out / "network" / "flwr-home" / "runtime-envs").exists(), (
        "the simulation must not install the app's dependencies at run time"
    )


def test_a_failed_simulation_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It printed "run directory: …" (a folder never written) and "did not complete
    (finished:failed)" with no reason; the ServerApp's log went with its SuperLink."""
    import fedpath.deploy.simulate as simulate

    config = simulate.simulation_run_config

    def refused(*args: object, **kwargs: object) -> dict[str, object]:
        return {**config(*args, **kwargs), "lr": 1e30}  # the ServerApp refuses its run config

    monkeypatch.setattr(simulate, "simulation_run_config", refused)
    out_dir = tmp_path / "sim"
    code = main(["simulate", "--sites", "2", "--rounds", "1", "--out", str(out_dir)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "the simulation did not complete (finished:failed)" in out
    (reason,) = [line for line in out.splitlines() if line.startswith("reason: ")]
    assert "lr" in reason and "1e+30" in reason, reason
    assert f"no run directory: the ServerApp wrote none ({out_dir / 'runs' / 'simulation'})" in out
    assert f"ServerApp log: {out_dir / 'serverapp.log'}" in out
    assert "1e+30" in (out_dir / "serverapp.log").read_text(encoding="utf-8")
