"""End to end on real processes: a SuperLink, three SuperNodes and `flwr run`, on loopback.

The app is submitted from this repository exactly as a coordinator would; completion is judged
from `flwr ls --format json`, not from `flwr run`'s exit code.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedpath.deploy.local_network import LocalNetwork
from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
SPEC = SyntheticSiteSpec(n_slides=10, feature_dim=16, patches=(10, 30))


def _wait_nodes(net: LocalNetwork, n: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while net.connected_nodes() < n:
        assert time.monotonic() < deadline, dict(net.logs())
        time.sleep(1.0)


def test_three_hospitals_complete_a_two_round_fedmix_run(tmp_path: Path) -> None:
    sites = {n: write_synthetic_site(tmp_path / n, SPEC, seed=i) for i, n in enumerate("abc")}
    with LocalNetwork(tmp_path / "net") as net:
        net.start_superlink()
        for name, data in sites.items():
            net.start_supernode(f"site_{name}", data)
        _wait_nodes(net, 3)
        run_id = net.submit(
            ROOT,
            {
                "num-server-rounds": 2,
                "local-epochs": 1,
                "min-sites": 3,
                "runs-dir": str(tmp_path / "runs"),
                "run-name": "e2e",
                "round-timeout": 300.0,
            },
        )
        status = net.wait_for_run(run_id, timeout=600)
        assert status == "finished:completed", dict(net.logs())
    run_dir = tmp_path / "runs" / "e2e"
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["replied"] == ["site_a", "site_b", "site_c"] for r in rounds)
    final = json.loads((run_dir / "final.json").read_text())
    assert final["status"] == "completed"
    assert (run_dir / "report.html").is_file()
    assert (run_dir / "checkpoints" / "round_0002.pt").is_file()


def test_a_harmonisation_failure_is_a_failed_run(tmp_path: Path) -> None:
    good = write_synthetic_site(tmp_path / "a", SPEC, seed=0)
    odd = write_synthetic_site(
        tmp_path / "b", SyntheticSiteSpec(n_slides=10, feature_dim=8), seed=1
    )
    with LocalNetwork(tmp_path / "net") as net:
        net.start_superlink()
        net.start_supernode("site_a", good)
        net.start_supernode("site_b", odd)
        _wait_nodes(net, 2)
        run_id = net.submit(ROOT, {"runs-dir": str(tmp_path / "runs"), "run-name": "bad"})
        assert net.wait_for_run(run_id, timeout=300) == "finished:failed"
    final = json.loads((tmp_path / "runs" / "bad" / "final.json").read_text())
    assert final["status"] == "failed"
    assert "site_b: embedded with synthetic (sha256 55555555…, 8-d), but" in final["reason"]
