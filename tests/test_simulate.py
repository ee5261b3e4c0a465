"""`fedpath simulate`: the same ServerApp/ClientApp in Flower's simulation engine (Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.cli import main
from server.simulate import simulated_site_specs

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
