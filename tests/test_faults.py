"""Faults survived on real processes: a lost site, all sites lost, a lost coordinator.

Hospitals run unattended, so each fault is produced the way it happens in production, with
SIGKILL to whole process groups (the SuperNode with the ClientApp it is running; the SuperLink,
and the detached SuperExec with the ServerApp it runs), on a real SuperLink and real SuperNodes
on loopback. Sites are tiny synthetic feature bags; every wait has its own deadline (there is
no pytest timeout plugin here), so a regression that hangs shows up as a failed assertion
naming what was awaited, with the processes' logs. One fast test pins how the round loop reads
the error Flower's SuperLink sends for a dead node (found by the site-loss test).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedpath.deploy.local_network import LocalNetwork
from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site

ROOT = Path(__file__).resolve().parents[1]
SPEC = SyntheticSiteSpec(n_slides=8, feature_dim=8, patches=(5, 15))
ALL_LOST_ROUND_TIMEOUT = 60.0
"""Round 2 waits this long for sites that are gone: short, but three times round 1 here."""
BASE_RUN: dict[str, Any] = {
    "local-epochs": 1,
    "model": "abmil",
    "supervision": "weak",
}


# -- helpers -----------------------------------------------------------------------------------


def _wait(condition: Callable[[], bool], what: str, timeout: float, net: LocalNetwork) -> None:
    """Poll ``condition`` for at most ``timeout`` s; fail naming ``what`` with the logs."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} (waited {timeout:.0f} s): {dict(net.logs())}"
        time.sleep(0.5)


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The round records of ``metrics.jsonl`` (rewritten atomically, so never torn)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _group_commands(pgid: int) -> list[str]:
    """Command lines of the live processes of one process group (from /proc).

    The SuperNode runs each message's ClientApp in a child process of its own group, so a
    ``flwr-clientapp`` here means the site is working on a message right now.
    """
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                out.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    return out


def _detached_groups(parent_pid: int) -> set[int]:
    """Process groups of the SuperExecs a process started in their own session.

    Flower 1.41's SuperLink starts its SuperExec detached (``start_new_session``), passing
    ``--parent-pid``; the ServerApp it starts stays in that SuperExec's group, so killing the
    SuperLink's group alone would leave the ServerApp running.
    """
    out: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if (
                b"--parent-pid" in argv
                and argv[argv.index(b"--parent-pid") + 1] == str(parent_pid).encode()
            ):
                out.add(os.getpgid(int(entry.name)))
    return out


def _kill_pgid(pgid: int, what: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _group_commands(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_commands(pgid), f"{what}: processes outlived SIGKILL"


def _kill_group(net: LocalNetwork, name: str) -> None:
    """SIGKILL a started process and every process of its group, as a power cut would."""
    managed = net.processes[name]
    os.killpg(managed.process.pid, signal.SIGKILL)
    managed.process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _group_commands(managed.process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_commands(managed.process.pid), f"{name}: processes outlived SIGKILL"


def _node_ids(log_text: str) -> list[int]:
    """Every ``SuperNode ID: N`` Flower logged when the SuperNode (re)activated."""
    return [int(m) for m in re.findall(r"SuperNode ID: (\d+)", log_text)]


def _write_sites(root: Path, names: str) -> dict[str, Path]:
    return {
        f"site_{n}": write_synthetic_site(root / f"site_{n}", SPEC, seed=i)
        for i, n in enumerate(names)
    }


# -- the round loop's view of a lost site (fast) ------------------------------------------------


class _SuperLinkAnswersForDeadNodes:
    """A grid whose SuperLink answers for the nodes in ``dead`` the way Flower 1.41 does
    once they miss their heartbeats: an error reply from the SuperLink's own node id."""

    def __init__(self, inner: Any, dead: set[int]) -> None:
        self.inner, self.dead = inner, dead
        self._errors: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def push_messages(self, messages: Any) -> list[str]:
        from flwr.server.superlink.linkstate.utils import (
            create_message_error_unavailable_res_message,
        )

        ids: list[str] = []
        for m in messages:
            if m.metadata.dst_node_id in self.dead:
                m.metadata.__dict__["_message_id"] = f"dead-{m.metadata.dst_node_id}"
                self._errors[m.metadata.message_id] = create_message_error_unavailable_res_message(
                    m.metadata, "node"
                )
                ids.append(m.metadata.message_id)
            else:
                ids.extend(self.inner.push_messages([m]))
        return ids

    def pull_messages(self, message_ids: Any) -> list[Any]:
        message_ids = list(message_ids)
        errors = [self._errors.pop(i) for i in message_ids if i in self._errors]
        return errors + list(self.inner.pull_messages(message_ids))


@pytest.mark.slow
def test_a_superlink_error_for_a_dead_node_is_that_site_failing(
    tmp_path: Path, flower_task: None
) -> None:
    """Regression: Flower's "Node Unavailable" reply comes from the SuperLink's node id (1);
    the round record named a phantom ``node 1`` and called the dead site timed out."""
    from fedpath.deploy.inprocess_grid import InProcessGrid, InProcessSite
    from fedpath.server.config import RunConfig
    from fedpath.server.federated_run import initial_arrays
    from fedpath.server.rounds import Federation
    from fedpath.server.run_log import RunLog
    from fedpath.server.strategies import build_strategy

    sites = _write_sites(tmp_path, "abc")
    inner = InProcessGrid({10 + i: InProcessSite(d, n) for i, (n, d) in enumerate(sites.items())})
    cfg = RunConfig.from_run_config({**BASE_RUN, "num-server-rounds": 1, "min-sites": 2})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    federation = Federation(
        grid=_SuperLinkAnswersForDeadNodes(inner, dead=set()),  # type: ignore[arg-type]
        cfg=cfg,
        log=RunLog(run_dir),
        strategy=build_strategy("fedavg", 10.0, 1.5),
    )
    federation.gate()
    federation.grid.dead.add(12)  # type: ignore[attr-defined]
    _, record = federation.train_round(1, initial_arrays(cfg, SPEC.feature_dim))
    assert record["replied"] == ["site_a", "site_b"]
    assert list(record["failed"]) == ["site_c"], record["failed"]
    assert "Node Unavailable" in record["failed"]["site_c"]


# -- site loss ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_a_site_killed_mid_round_is_left_out_and_rejoins_with_its_node_id(
    tmp_path: Path,
) -> None:
    """TLS + node auth, three registered SuperNodes, four rounds; site_c is SIGKILLed while
    it trains round 2 and restarted with the same key once round 2 is recorded."""
    from fedpath.server.security import create_certificates, create_node_keys, register_public_keys

    sites = _write_sites(tmp_path, "abc")
    pairs = {p.site: p for p in create_node_keys(tmp_path / "keys", list(sites))}
    certs = create_certificates(tmp_path / "pki")
    run_dir = tmp_path / "runs" / "site-loss"
    timeout = 90.0  # a loaded CI machine needs ~40-70 s for a first round of tiny sites
    net = LocalNetwork(
        tmp_path / "net",
        tls_ca=certs.ca_cert,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        node_auth=True,
    )
    with net:
        net.start_superlink()
        register_public_keys(net.cli, [p.public_key for p in pairs.values()])
        for site, data in sites.items():
            net.start_supernode(site, data, private_key=pairs[site].private_key)
        _wait(lambda: net.connected_nodes() == 3, "three SuperNodes online", 120, net)
        victim = net.processes["node-site_c"]
        _wait(lambda: bool(_node_ids(victim.tail(200))), "site_c's node id", 30, net)
        (node_id,) = _node_ids(victim.tail(200))
        run_id = net.submit(
            ROOT,
            {
                **BASE_RUN,
                "num-server-rounds": 4,
                "min-sites": 2,
                "min-fit-fraction": 0.5,
                "round-timeout": timeout,
                "max-round-attempts": 2,
                "runs-dir": str(run_dir.parent),
                "run-name": run_dir.name,
            },
        )
        _wait(lambda: len(_rounds(run_dir)) >= 1, "round 1 recorded", 240, net)
        # Round 2 starts right after round 1 is recorded; kill while site_c's ClientApp is
        # training it (its flwr-clientapp child is up, so the message has been delivered).
        _wait(
            lambda: any("flwr-clientapp" in c for c in _group_commands(victim.process.pid)),
            "site_c training round 2",
            120,
            net,
        )
        assert len(_rounds(run_dir)) == 1, "round 2 finished before site_c could be killed"
        killed_at = time.monotonic()
        _kill_group(net, "node-site_c")

        _wait(lambda: len(_rounds(run_dir)) >= 2, "round 2 recorded without site_c", 180, net)
        round_2_seconds = time.monotonic() - killed_at
        net.stop_process("node-site_c")  # only closes the log of the dead process
        net.start_supernode("site_c", sites["site_c"], private_key=pairs["site_c"].private_key)
        restarted = net.processes["node-site_c"]
        _wait(lambda: len(_node_ids(restarted.tail(400))) >= 2, "site_c re-activated", 90, net)
        status = net.wait_for_run(run_id, timeout=360)
        assert status == "finished:completed", dict(net.logs())
        # Flower derives a SuperNode's identity from its registered key: the same id again.
        assert _node_ids(restarted.tail(400))[-1] == node_id

    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert rounds[0]["sampled"] == ["site_a", "site_b", "site_c"]
    second = rounds[1]
    assert second["replied"] == ["site_a", "site_b"], second
    assert second["sampled"] == ["site_a", "site_b", "site_c"]
    # Flower marks a node offline when it misses its heartbeats (2 x 30 s) and then answers
    # the pending message with "Node Unavailable"; the round-timeout bounds it otherwise.
    assert list(second["failed"]) == ["site_c"], second["failed"]  # no phantom "node 1"
    assert re.search(
        r"Node Unavailable|no reply within round-timeout", second["failed"]["site_c"]
    ), second["failed"]
    assert second["attempt"] == 1
    # The training exchange ends within round-timeout of the kill; the evaluation after it no
    # longer waits for site_c, once the SuperLink lists it offline.
    assert round_2_seconds < 2 * timeout, round_2_seconds
    assert any("site_c" in r["replied"] for r in rounds[2:]), [r["replied"] for r in rounds]
    final = json.loads((run_dir / "final.json").read_text())
    assert final["status"] == "completed" and final["rounds_completed"] == 4


@pytest.mark.slow
@pytest.mark.integration
def test_all_sites_lost_ends_the_run_as_failed_with_the_reason(tmp_path: Path) -> None:
    """Both SuperNodes are SIGKILLed during round 2: bounded retries, then a failed run."""
    sites = _write_sites(tmp_path, "ab")
    run_dir = tmp_path / "runs" / "all-lost"
    with LocalNetwork(tmp_path / "net") as net:
        net.start_superlink()
        for site, data in sites.items():
            net.start_supernode(site, data)
        _wait(lambda: net.connected_nodes() == 2, "two SuperNodes online", 120, net)
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
        _wait(lambda: len(_rounds(run_dir)) >= 1, "round 1 recorded", 240, net)
        killed_at = time.monotonic()
        for site in sites:
            _kill_group(net, f"node-{site}")
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
    assert [r["round"] for r in _rounds(run_dir)] == [1]


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
    sites = _write_sites(tmp_path, "ab")
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
        _wait(lambda: net.connected_nodes() == 2, "two SuperNodes online", 120, net)
        first_run = net.submit(ROOT, run_config)
        _wait(lambda: len(_rounds(run_dir)) >= 1, "round 1 recorded", 240, net)
        _wait(
            lambda: (
                all(2 in r for d in sites.values() for r in _ledger_rounds(d).values())
                and all(_ledger_rounds(d) for d in sites.values())
            ),
            "both sites recording round 2 in their ledgers",
            120,
            net,
        )
        link = net.processes["superlink"]
        coordinator = _detached_groups(link.process.pid)
        serverapp = [c for g in coordinator for c in _group_commands(g) if "flwr-serverapp" in c]
        assert serverapp, [_group_commands(g) for g in coordinator]
        assert len(_rounds(run_dir)) == 1, "round 2 finished before the coordinator was killed"
        _kill_group(net, "superlink")
        for pgid in coordinator:  # the SuperExec and the ServerApp it runs
            _kill_pgid(pgid, "the ServerApp")
        assert (run_dir / "checkpoints" / "round_0001.pt").is_file()
        assert not (run_dir / "checkpoints" / "round_0002.pt").exists()
        assert not (run_dir / "final.json").exists()

        net.stop_process("superlink")  # only closes the dead process's log
        net.start_superlink()  # same port, same superlink-state.db
        # The SuperNodes were never stopped: they retry until the SuperLink is back.
        _wait(lambda: net.connected_nodes() == 2, "SuperNodes reconnected", 180, net)
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
        _wait(
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

    rounds = _rounds(run_dir)
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
