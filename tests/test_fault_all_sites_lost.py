"""All sites lost mid-run on real processes: bounded retries, then a failed run with the reason."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from fedpath.deploy.local_network import LocalNetwork
from tests.faults import (
    BASE_RUN,
    ROOT,
    kill_group,
    recorded_rounds,
    wait,
    write_sites,
)

ALL_LOST_ROUND_TIMEOUT = 60.0
"""Round 2 waits this long for sites that are gone: short, but three times round 1 here."""


@pytest.mark.slow
@pytest.mark.integration
def test_all_sites_lost_ends_the_run_as_failed_with_the_reason(tmp_path: Path) -> None:
    """Both SuperNodes are SIGKILLed during round 2: bounded retries, then a failed run."""
    sites = write_sites(tmp_path, "ab")
    run_dir = tmp_path / "runs" / "all-lost"
    with LocalNetwork(tmp_path / "net") as net:
        net.start_superlink()
        for site, data in sites.items():
            net.start_supernode(site, data)
        wait(lambda: net.connected_nodes() == 2, "two SuperNodes online", 120, net)
        run_id = net.submit(
            ROOT,
            {
                **BASE_RUN,
                "num-server-rounds": 3,
                "min-sites": 2,
                "round-timeout": ALL_LOST_ROUND_TIMEOUT,
                "connect-timeout": 30.0,
                "max-round-attempts": 2,
                "runs-dir": str(run_dir.parent),
                "run-name": run_dir.name,
            },
        )
        wait(lambda: len(recorded_rounds(run_dir)) >= 1, "round 1 recorded", 240, net)
        killed_at = time.monotonic()
        for site in sites:
            kill_group(net, f"node-{site}")
        status = net.wait_for_run(run_id, timeout=240)
        took = time.monotonic() - killed_at
        assert status == "finished:failed", dict(net.logs())
    final = json.loads((run_dir / "final.json").read_text())
    assert final["status"] == "failed"
    assert final["rounds_completed"] == 1
    reason = final["reason"]
    # Which bound ends it depends on when the SuperLink marks the dead nodes offline: either
    # every attempt of round 2 got no reply, or no site was connected within connect-timeout.
    assert re.search(
        r"round 2 failed 2 time\(s\) \(max-round-attempts\): too few sites answered"
        r"|only 0 site\(s\) connected, 2 needed \(min-sites\)",
        reason,
    ), reason
    # Bounded by the settings: two attempts of at most round-timeout, or one and then
    # connect-timeout, plus the polling of flwr ls.
    assert took < 2 * ALL_LOST_ROUND_TIMEOUT + 30 + 30, took
    assert [r["round"] for r in recorded_rounds(run_dir)] == [1]
