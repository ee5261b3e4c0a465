"""The coordinator killed mid-round on real processes: a new SuperLink on the same state,
then `fedpath run --resume` finishes without losing or double-counting a round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpath.deploy.local_network import LocalNetwork
from tests.faults import (
    BASE_RUN,
    ROOT,
    detached_groups,
    group_commands,
    kill_group,
    kill_pgid,
    recorded_rounds,
    wait,
    write_sites,
)

# -- coordinator loss --------------------------------------------------------------------------


def _ledger_rounds(data_dir: Path) -> dict[str, list[int]]:
    """Run key → the rounds recorded for it, over every dataset of the site's ledger."""
    from fedpath.client.privacy_ledger import LEDGER_FILE, PrivacyLedger

    if not (data_dir / LEDGER_FILE).is_file():
        return {}
    out: dict[str, list[int]] = {}
    for record in PrivacyLedger.load(data_dir).datasets.values():
        for entry in record.entries:
            out.setdefault(entry.run, []).append(entry.round)
    return out


@pytest.mark.slow
@pytest.mark.integration
def test_coordinator_killed_mid_round_resumes_without_losing_or_double_counting(
    tmp_path: Path,
) -> None:
    """Slide-level DP on, three rounds: the SuperLink's process group (SuperLink, SuperExec,
    ServerApp) is SIGKILLed while the sites train round 2 (each has already recorded round 2
    in its privacy ledger); a new SuperLink on the same state database and port, then
    ``fedpath run --resume RUN_DIR`` finishes rounds 2 and 3."""
    from fedpath.client.privacy_ledger import PrivacyLedger, run_epsilon
    from fedpath.client.training.privacy_accountant import epsilon
    from fedpath.client.training.private_trainer import plan_private_training
    from fedpath.deploy.cli import main as fedpath_main
    from fedpath.server.config import RunConfig

    rounds_planned = 3
    sites = write_sites(tmp_path, "ab")
    run_dir = tmp_path / "runs" / "coordinator-loss"
    run_config = {
        **BASE_RUN,
        "num-server-rounds": rounds_planned,
        "min-sites": 2,
        "round-timeout": 90.0,
        "dp-noise-multiplier": 1.0,
        "dp-batch-slides": 2,
        "runs-dir": str(run_dir.parent),
        "run-name": run_dir.name,
    }
    budget = {"privacy-budget": 1000.0}
    with LocalNetwork(tmp_path / "net") as net:
        net.start_superlink()
        for site, data in sites.items():
            net.start_supernode(site, data, extra_node_config=budget)
        wait(lambda: net.connected_nodes() == 2, "two SuperNodes online", 120, net)
        first_run = net.submit(ROOT, run_config)
        wait(lambda: len(recorded_rounds(run_dir)) >= 1, "round 1 recorded", 240, net)
        wait(
            lambda: (
                all(2 in r for d in sites.values() for r in _ledger_rounds(d).values())
                and all(_ledger_rounds(d) for d in sites.values())
            ),
            "both sites recording round 2 in their ledgers",
            120,
            net,
        )
        link = net.processes["superlink"]
        coordinator = detached_groups(link.process.pid)
        serverapp = [c for g in coordinator for c in group_commands(g) if "flwr-serverapp" in c]
        assert serverapp, [group_commands(g) for g in coordinator]
        assert len(recorded_rounds(run_dir)) == 1, (
            "round 2 finished before the coordinator was killed"
        )
        kill_group(net, "superlink")
        for pgid in coordinator:  # the SuperExec and the ServerApp it runs
            kill_pgid(pgid, "the ServerApp")
        assert (run_dir / "checkpoints" / "round_0001.pt").is_file()
        assert not (run_dir / "checkpoints" / "round_0002.pt").exists()
        assert not (run_dir / "final.json").exists()

        net.stop_process("superlink")  # only closes the dead process's log
        net.start_superlink()  # same port, same superlink-state.db
        # The SuperNodes were never stopped: they retry until the SuperLink is back.
        wait(lambda: net.connected_nodes() == 2, "SuperNodes reconnected", 180, net)
        assert all(net.processes[f"node-{s}"].alive() for s in sites)
        code = fedpath_main(
            [
                "run",
                "--superlink",
                net.address,
                "--insecure",
                "--flwr-home",
                str(net.flwr_home),
                "--resume",
                str(run_dir),
                "--timeout",
                "400",
            ]
        )
        assert code == 0, dict(net.logs())

        def statuses() -> dict[int, str]:
            listed = net.flwr("ls", "local").get("runs") or []
            return {int(r["run-id"]): str(r["status"]) for r in listed}

        # The restarted SuperLink fails the killed run itself once its heartbeat is overdue
        # ("No heartbeat received from the task"); the resumed run, now that replies are
        # pulled every 0.2 s, can complete before that, so wait for it (bounded).
        wait(
            lambda: statuses().get(first_run) == "finished:failed",
            "the killed run marked failed by the restarted SuperLink",
            120,
            net,
        )
        runs = statuses()
        assert runs[first_run] == "finished:failed" and len(runs) == 2, runs
        assert [status for run, status in runs.items() if run != first_run] == [
            "finished:completed"
        ], runs

    rounds = recorded_rounds(run_dir)
    assert [r["round"] for r in rounds] == list(range(1, rounds_planned + 1))
    assert all(r["replied"] == sorted(sites) for r in rounds)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"round_{n:04d}.pt" for n in range(1, rounds_planned + 1)]
    final = json.loads((run_dir / "final.json").read_text())
    assert final["status"] == "completed" and final["rounds_completed"] == rounds_planned

    dp = RunConfig.from_run_config(run_config).dp_config()
    reported = final["slide_level_dp"]["sites"]
    for site, data in sites.items():
        (record,) = PrivacyLedger.load(data).datasets.values()
        (run_key,) = record.runs()
        entries = record.run_entries(run_key)
        assert sorted(e.round for e in entries) == list(range(1, rounds_planned + 1)), entries
        planned = plan_private_training(dp, entries[0].n_slides, epochs=1)
        assert all(e.mechanism == planned for e in entries)
        expected = epsilon([planned] * rounds_planned, dp.delta, dp.accountant)
        assert run_epsilon(entries)[0] == pytest.approx(expected, rel=1e-9)
        assert reported[site]["epsilon"] == pytest.approx(expected, rel=1e-9)
