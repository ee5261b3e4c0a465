"""The federated round loop against the real ClientApp in process (no daemons).

Covers the gate, bounded rounds with a silent or failing site, retries, the run directory
contract, checkpoints and resume (same final model as an uninterrupted run).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from fedpath.common.errors import ConfigError
from fedpath.deploy.inprocess_grid import InProcessGrid, InProcessSite
from fedpath.server.checkpoints import latest_checkpoint, load_checkpoint
from fedpath.server.config import RunConfig
from fedpath.server.federated_run import run_federated
from fedpath.server.harmonise import HarmonisationError
from fedpath.server.rounds import RunFailed
from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site

pytestmark = pytest.mark.usefixtures("flower_task")

SPEC = SyntheticSiteSpec(n_slides=10, feature_dim=16, patches=(10, 30))


@pytest.fixture(scope="module")
def site_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sites")
    return {name: write_synthetic_site(root / name, SPEC, seed=i) for i, name in enumerate("abc")}


def _grid(site_dirs: dict[str, Path], **silent: set[int]) -> InProcessGrid:
    return InProcessGrid(
        {
            10 + i: InProcessSite(path, f"site_{name}", silent_rounds=silent.get(name, set()))
            for i, (name, path) in enumerate(sorted(site_dirs.items()))
        }
    )


def _cfg(tmp_path: Path, **overrides: object) -> RunConfig:
    base = {
        "num-server-rounds": 2,
        "local-epochs": 1,
        "lr": 1e-3,
        "runs-dir": str(tmp_path / "runs"),
        "run-name": "run",
        "connect-timeout": 1.0,
    }
    return RunConfig.from_run_config({**base, **overrides})


def _server_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The round loop's log lines so far (what the ServerApp forwards to Flower's log)."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("fedpath.server")]


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_full_run_writes_the_run_directory_contract(site_dirs, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="fedpath")
    run_dir = run_federated(_grid(site_dirs), _cfg(tmp_path), flwr_run_id=3)
    messages = _server_log(caplog)
    assert messages[0] == f"run directory: {run_dir}"  # `fedpath run` looks for this line
    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["replied"] == ["site_a", "site_b", "site_c"] and r["failed"] == {}
        assert sum(r["weights"].values()) == pytest.approx(1.0)
        assert set(r["train"]) == set(r["evaluate"]) == {"site_a", "site_b", "site_c"}
        assert r["train"]["site_a"]["num_examples"] == 6
        assert r["privacy"] == {}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run_config"]["num-server-rounds"] == 2
    assert set(config["sites"]) == {"site_a", "site_b", "site_c"}
    assert "slide_" not in json.dumps(config), "no slide ids in the coordinator's records"
    final = json.loads((run_dir / "final.json").read_text())
    assert final["status"] == "completed" and final["rounds_completed"] == 2
    assert set(final["test"]) == {"site_a", "site_b", "site_c"}
    assert final["global_test"]["num_examples"] == sum(
        m["num_examples"] for m in final["test"].values()
    )
    # Pooled over all sites' test slides, and it says so; the sites' mean has its own name.
    assert final["global_test"]["pooling"].startswith("pooled over every slide")
    assert "auc_site_mean" in final["global_test"]
    # 2 val slides a site: too few to calibrate, and final.json and the log say why.
    assert final["calibration"]["fitted"] is False
    assert "need ≥ 5 per class" in final["calibration"]["reason"]
    assert any(m.startswith("calibration of the final model: uncalibrated") for m in messages)
    for site in final["test"].values():  # the sums stay out of the per-site records
        assert not any(isinstance(v, list) for v in site.values())
    assert load_checkpoint(latest_checkpoint(run_dir)).server_round == 2
    assert any("harmonisation passed" in m for m in messages)


@pytest.mark.slow
def test_a_silent_site_is_logged_and_asked_again(site_dirs, tmp_path) -> None:
    grid = _grid(site_dirs, c={1})
    run_dir = run_federated(grid, _cfg(tmp_path), flwr_run_id=3)
    first, second = _rounds(run_dir)
    assert first["replied"] == ["site_a", "site_b"]
    assert "no reply within round-timeout" in first["failed"]["site_c"]
    assert set(first["weights"]) == {"site_a", "site_b"}
    assert second["replied"] == ["site_a", "site_b", "site_c"]


@pytest.mark.slow
def test_too_few_replies_retry_then_fail_with_a_record(site_dirs, tmp_path) -> None:
    grid = _grid(site_dirs, a={2}, b={2}, c={2})
    cfg = _cfg(tmp_path, **{"max-round-attempts": 2})
    with pytest.raises(RunFailed, match="round 2 failed 2 time"):
        run_federated(grid, cfg, flwr_run_id=3)
    run_dir = tmp_path / "runs" / "run"
    assert len(_rounds(run_dir)) == 1
    final = json.loads((run_dir / "final.json").read_text())
    assert final["status"] == "failed" and final["rounds_completed"] == 1
    assert "max-round-attempts" in final["reason"]


@pytest.mark.slow
def test_min_fit_fraction_one_fails_a_round_with_one_silent_site(
    site_dirs, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="fedpath")
    grid = _grid(site_dirs, c={1})
    cfg = _cfg(tmp_path, **{"min-fit-fraction": 1.0, "max-round-attempts": 2})
    with pytest.raises(RunFailed, match="round 1 failed 2 time"):
        run_federated(grid, cfg, flwr_run_id=3)
    messages = _server_log(caplog)
    assert sum("2 of 3 site(s) answered, 3 needed" in m for m in messages) == 2
    assert messages[-1].startswith("run failed after 0 round(s): round 1 failed 2 time")


def test_harmonisation_mismatch_stops_before_round_one(site_dirs, tmp_path) -> None:
    odd = write_synthetic_site(
        tmp_path / "odd", SyntheticSiteSpec(n_slides=10, feature_dim=8), seed=5
    )
    grid = _grid({**site_dirs, "z": odd})
    with pytest.raises(HarmonisationError) as info:
        run_federated(grid, _cfg(tmp_path), flwr_run_id=3)
    assert any(
        p.startswith("site_z: embedded with synthetic (sha256 55555555…, 8-d), but")
        for p in info.value.problems
    )
    assert not (tmp_path / "runs" / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_too_few_sites_connected_is_a_bounded_failure(site_dirs, tmp_path) -> None:
    grid = _grid({"a": site_dirs["a"]})
    with pytest.raises(RunFailed, match="only 1 site"):
        run_federated(grid, _cfg(tmp_path), flwr_run_id=3)


@pytest.mark.slow
def test_existing_run_directory_is_not_overwritten(site_dirs, tmp_path) -> None:
    run_federated(_grid(site_dirs), _cfg(tmp_path), flwr_run_id=3)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_federated(_grid(site_dirs), _cfg(tmp_path), flwr_run_id=4)


@pytest.mark.slow
def test_resume_gives_the_same_final_model_as_an_uninterrupted_run(
    site_dirs, tmp_path, caplog
) -> None:
    cfg = {"num-server-rounds": 3}
    full = run_federated(
        _grid(site_dirs), _cfg(tmp_path, **cfg, **{"run-name": "full"}), flwr_run_id=1
    )
    # Interrupted: every site goes silent in round 3, so the run dies after round 2.
    broken = _cfg(tmp_path, **cfg, **{"run-name": "broken", "max-round-attempts": 1})
    with pytest.raises(RunFailed):
        run_federated(_grid(site_dirs, a={3}, b={3}, c={3}), broken, flwr_run_id=2)
    broken_dir = tmp_path / "runs" / "broken"
    assert load_checkpoint(latest_checkpoint(broken_dir)).server_round == 2
    # Resume with only `resume` given: the recorded config (3 rounds) decides the final round.
    resumed = _cfg(tmp_path, **{"resume": str(broken_dir), "num-server-rounds": 1})
    caplog.set_level(logging.INFO, logger="fedpath")
    run_federated(_grid(site_dirs), resumed, flwr_run_id=3)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "resume: using the recorded num-server-rounds=3, not 1" in warned
    assert [r["round"] for r in _rounds(broken_dir)] == [1, 2, 3]
    a = load_checkpoint(latest_checkpoint(full))
    b = load_checkpoint(latest_checkpoint(broken_dir))
    assert a.server_round == b.server_round == 3
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
    assert json.loads((broken_dir / "final.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_resume_refuses_a_corrupted_checkpoint(site_dirs, tmp_path) -> None:
    run_dir = run_federated(_grid(site_dirs), _cfg(tmp_path), flwr_run_id=1)
    latest_checkpoint(run_dir).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable fedpath checkpoint"):
        run_federated(_grid(site_dirs), _cfg(tmp_path, resume=str(run_dir)), flwr_run_id=2)


@pytest.mark.slow
def test_a_site_out_of_privacy_budget_is_left_out_and_the_run_goes_on(tmp_path, caplog) -> None:
    """Slide-level DP-SGD: site_c's budget covers one round (6 training slides, expected
    batch 2: q = 1/3, 3 steps a round), so from round 2 it answers "budget exhausted", is not
    aggregated, and the other two sites finish the run."""
    from fedpath.client.training.privacy_accountant import Mechanism, epsilon

    one_round = Mechanism(1.0, 1 / 3, 3)
    one, two = epsilon([one_round], 1e-5), epsilon([one_round] * 2, 1e-5)
    dirs = {n: write_synthetic_site(tmp_path / n, SPEC, seed=i) for i, n in enumerate("abc")}
    grid = InProcessGrid(
        {
            10 + i: InProcessSite(
                path,
                f"site_{name}",
                node_config={"privacy-budget": (one + two) / 2} if name == "c" else {},
            )
            for i, (name, path) in enumerate(sorted(dirs.items()))
        }
    )
    cfg = _cfg(
        tmp_path,
        **{"num-server-rounds": 2, "dp-noise-multiplier": 1.0, "dp-batch-slides": 2},
    )
    caplog.set_level(logging.INFO, logger="fedpath")
    run_dir = run_federated(grid, cfg, flwr_run_id=3)
    messages = _server_log(caplog)
    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["budget_exhausted"] == {} and set(rounds[0]["weights"]) == {
        "site_a",
        "site_b",
        "site_c",
    }
    for r in rounds[1:]:
        assert set(r["budget_exhausted"]) == {"site_c"}
        assert set(r["weights"]) == set(r["train"]) == {"site_a", "site_b"}
        assert "site_c" in r["replied"] and r["failed"] == {}
        assert r["privacy"]["site_c"]["epsilon"] == pytest.approx(one)
    for k, r in enumerate(rounds, 1):
        for site in ("site_a", "site_b"):
            assert r["privacy"][site]["epsilon"] == pytest.approx(epsilon([one_round] * k, 1e-5))
            assert r["privacy"][site]["delta"] == 1e-5
    assert sum("site_c has exhausted its privacy budget" in m for m in messages) == 1
    final = json.loads((run_dir / "final.json").read_text())
    assert final["status"] == "completed"
    dp = final["slide_level_dp"]
    assert dp["privacy_unit"] == "slide" and "RDP" in dp["accountant"]
    assert dp["budget_exhausted_from_round"] == {"site_c": 2}
    assert final["privacy_guarantee"].startswith("slide-level DP-SGD")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["privacy_guarantee"].startswith("planned: slide-level DP-SGD")
    assert "privacy budget exhausted" in (run_dir / "report.html").read_text()


@pytest.mark.slow
def test_the_serverapp_logs_what_fedpath_run_reads_on_flowers_logger(site_dirs, tmp_path) -> None:
    """``flwr log`` shows Flower's logger: the ServerApp forwards the round loop's records
    there as ``[fedpath] `` lines, where ``fedpath run`` finds the run directory and
    ``fedpath simulate`` the reason a run failed; nothing is forwarded once ``main`` ends."""
    from flwr.app import Context, RecordDict
    from flwr.common.logger import FLOWER_LOGGER

    from fedpath.deploy.simulate import failure_reason
    from fedpath.server.app import main
    from fedpath.server.run_log import RUN_DIR_PREFIX

    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname} : {record.getMessage()}")

    capture = Capture()
    FLOWER_LOGGER.addHandler(capture)
    fedpath_logger = logging.getLogger("fedpath")
    handlers, level = list(fedpath_logger.handlers), fedpath_logger.level
    try:
        run_config = _cfg(tmp_path).to_run_config()
        context = Context(
            run_id=9, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
        )
        with pytest.raises(RunFailed, match="only 1 site"):
            main(_grid({"a": site_dirs["a"]}), context)
        logging.getLogger("fedpath.server.rounds").warning("after the run")
    finally:
        FLOWER_LOGGER.removeHandler(capture)
    run_dir = (tmp_path / "runs" / "run").resolve()
    assert lines[0] == f"INFO : [fedpath] {RUN_DIR_PREFIX}{run_dir}"
    assert lines[-1].startswith("INFO : [fedpath] run failed after 0 round(s): only 1 site")
    assert all("[fedpath] " in line for line in lines)
    assert failure_reason(tmp_path / "elsewhere", "\n".join(lines)) == lines[-1].split("] ", 1)[1]
    assert (fedpath_logger.handlers, fedpath_logger.level) == (handlers, level)
