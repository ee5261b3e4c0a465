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

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from fedpath.deploy.local_network import LocalNetwork
from tests.faults import (
    BASE_RUN,
    ROOT,
    SPEC,
    group_commands,
    kill_group,
    node_ids,
    recorded_rounds,
    wait,
    write_sites,
)


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

    sites = write_sites(tmp_path, "abc")
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

    sites = write_sites(tmp_path, "abc")
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
        wait(lambda: net.connected_nodes() == 3, "three SuperNodes online", 120, net)
        victim = net.processes["node-site_c"]
        wait(lambda: bool(node_ids(victim.tail(200))), "site_c's node id", 30, net)
        (node_id,) = node_ids(victim.tail(200))
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
        wait(lambda: len(recorded_rounds(run_dir)) >= 1, "round 1 recorded", 240, net)
        # Round 2 starts right after round 1 is recorded; kill while site_c's ClientApp is
        # training it (its flwr-clientapp child is up, so the message has been delivered).
        wait(
            lambda: any("flwr-clientapp" in c for c in group_commands(victim.process.pid)),
            "site_c training round 2",
            120,
            net,
        )
        assert len(recorded_rounds(run_dir)) == 1, "round 2 finished before site_c could be killed"
        killed_at = time.monotonic()
        kill_group(net, "node-site_c")

        wait(
            lambda: len(recorded_rounds(run_dir)) >= 2, "round 2 recorded without site_c", 180, net
        )
        round_2_seconds = time.monotonic() - killed_at
        net.stop_process("node-site_c")  # only closes the log of the dead process
        net.start_supernode("site_c", sites["site_c"], private_key=pairs["site_c"].private_key)
        restarted = net.processes["node-site_c"]
        wait(lambda: len(node_ids(restarted.tail(400))) >= 2, "site_c re-activated", 90, net)
        status = net.wait_for_run(run_id, timeout=360)
        assert status == "finished:completed", dict(net.logs())
        # Flower derives a SuperNode's identity from its registered key: the same id again.
        assert node_ids(restarted.tail(400))[-1] == node_id

    rounds = recorded_rounds(run_dir)
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
