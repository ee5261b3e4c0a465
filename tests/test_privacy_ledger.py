"""The privacy ledger: ε across rounds, processes and runs; retries; the budget; the CLI.

Each ``train_on_site`` call below gets a fresh ``SitePrivacy`` (no ``Context.state``), which is
what a fresh ClientApp process on a restarted SuperNode sees: only the ledger on disk remains.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from fedpath.client import privacy_ledger
from fedpath.client.federated import SitePrivacy, train_on_site
from fedpath.client.privacy_ledger import (
    LEDGER_FILE,
    DatasetRecord,
    LedgerEntry,
    NodeBudget,
    PrivacyLedger,
    reserve_round,
    summarise,
)
from fedpath.client.training.privacy_accountant import Mechanism, epsilon
from fedpath.common.errors import ConfigError, FedpathError
from fedpath.common.federation import RoundInstructions
from fedpath.deploy.cli import EXIT_OK, EXIT_USAGE, main
from fedpath.server.config import RunConfig
from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site

SPEC = SyntheticSiteSpec(n_slides=10, feature_dim=16, patches=(10, 30))
DP_RUN = {"local-epochs": 1, "dp-noise-multiplier": 1.0, "dp-batch-slides": 2, "lr": 1e-3}
# 6 training slides, expected batch 2: q = 1/3 and 3 steps per round.
ROUND = Mechanism(1.0, 1 / 3, 3)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_synthetic_site(tmp_path / "site_a", SPEC, seed=0)


def _cfg(**overrides: object) -> RunConfig:
    return RunConfig.from_run_config({**DP_RUN, **overrides})


def _instructions(cfg: RunConfig, server_round: int, run: str = "run-a") -> RoundInstructions:
    return RoundInstructions(
        server_round=server_round,
        model=cfg.model_config_for(SPEC.feature_dim),
        train=cfg.train_config(),
        start_epoch=server_round - 1,
        dp=cfg.dp_config(),
        run_key=run,
    )


def _initial(cfg: RunConfig) -> dict[str, np.ndarray]:
    from fedpath.server.federated_run import initial_arrays

    return initial_arrays(cfg, SPEC.feature_dim)


def _train(
    site: Path, cfg: RunConfig, server_round: int, state, run: str = "run-a", **budget: float
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    privacy = SitePrivacy(budget=NodeBudget(**budget), run_id="1", site="site_a")
    return train_on_site(site, _instructions(cfg, server_round, run), state, privacy)


def test_epsilon_grows_every_round_and_survives_a_restart(site: Path) -> None:
    cfg = _cfg()
    state = _initial(cfg)
    spent = []
    for server_round in (1, 2, 3):
        state, metrics = _train(site, cfg, server_round, state)
        assert metrics["budget-exhausted"] == 0.0 and metrics["delta"] == 1e-5
        spent.append(metrics["epsilon"])
    assert spent[0] < spent[1] < spent[2]
    for k, eps in enumerate(spent, 1):
        assert eps == pytest.approx(epsilon([ROUND] * k, 1e-5))
    ledger = PrivacyLedger.load(site)  # a new process: the file is all there is
    (record,) = ledger.datasets.values()
    assert [(e.run, e.round) for e in record.entries] == [("run-a", r) for r in (1, 2, 3)]
    assert all(e.privacy_unit == "slide" and e.accountant == "rdp" for e in record.entries)
    assert "slide_0" not in (site / LEDGER_FILE).read_text(), "slide ids are stored hashed"


def test_a_retried_round_is_not_counted_twice_and_releases_the_same_update(site: Path) -> None:
    cfg = _cfg()
    start = _initial(cfg)
    first, m1 = _train(site, cfg, 1, start)
    again, m2 = _train(site, cfg, 1, start)  # the same round asked again (retry, resume)
    assert m1["epsilon"] == m2["epsilon"] == pytest.approx(epsilon([ROUND], 1e-5))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert len(next(iter(PrivacyLedger.load(site).datasets.values())).entries) == 1
    # The same round with another model is another release: it is counted.
    other = {k: v + np.float32(0.01) for k, v in start.items()}
    _, m3 = _train(site, cfg, 1, other)
    assert m3["epsilon"] == pytest.approx(epsilon([ROUND, ROUND], 1e-5))


def test_budget_exhaustion_stops_training_at_the_right_round(site: Path) -> None:
    cfg = _cfg()
    two, three = epsilon([ROUND] * 2, 1e-5), epsilon([ROUND] * 3, 1e-5)
    budget = (two + three) / 2  # rounds 1 and 2 fit, round 3 would not
    state = _initial(cfg)
    for server_round in (1, 2):
        state, metrics = _train(site, cfg, server_round, state, epsilon=budget)
        assert metrics["budget-exhausted"] == 0.0
    returned, metrics = _train(site, cfg, 3, state, epsilon=budget)
    assert metrics["budget-exhausted"] == 1.0
    assert metrics["epsilon"] == pytest.approx(two), "what the run has spent, unchanged"
    assert np.isnan(metrics["train-loss"])
    for key in state:
        np.testing.assert_array_equal(returned[key], state[key])
    (record,) = PrivacyLedger.load(site).datasets.values()
    assert [e.round for e in record.entries] == [1, 2] and record.budget_epsilon == budget
    # A later run on the same data starts from the lifetime spent: it cannot train at all.
    _, metrics = _train(site, cfg, 1, _initial(cfg), run="run-b", epsilon=budget)
    assert metrics["budget-exhausted"] == 1.0 and metrics["epsilon"] == 0.0


def test_the_ledger_sums_runs_and_slides_shared_between_datasets(site: Path) -> None:
    cfg = _cfg()
    state = _initial(cfg)
    for server_round in (1, 2):
        state, _ = _train(site, cfg, server_round, state, run="run-a")
    _train(site, cfg, 1, _initial(cfg), run="run-b", epsilon=50.0)
    (summary,) = summarise(site)
    assert [(r.run, r.rounds) for r in summary.runs] == [("run-a", 2), ("run-b", 1)]
    assert summary.runs[0].epsilon == pytest.approx(epsilon([ROUND] * 2, 1e-5))
    lifetime = epsilon([ROUND] * 3, 1e-5)
    assert summary.lifetime_epsilon == pytest.approx(lifetime)
    assert summary.lifetime_epsilon < sum(r.epsilon for r in summary.runs)
    assert summary.budget_left == pytest.approx(50.0 - lifetime)
    # The same slides prepared again (another dataset id) keep the privacy already spent.
    ledger = PrivacyLedger.load(site)
    (record,) = ledger.datasets.values()
    ledger.datasets["re-prepared"] = DatasetRecord("re-prepared", record.slides, "now")
    ledger.datasets["unrelated"] = DatasetRecord("unrelated", frozenset({"x"}), "now")
    assert ledger.lifetime_epsilon("re-prepared", 1e-5) == pytest.approx(lifetime)
    assert ledger.lifetime_epsilon("unrelated", 1e-5) == 0.0


def test_context_state_puts_back_a_lost_ledger(site: Path) -> None:
    cfg = _cfg()
    state = _initial(cfg)
    privacy = SitePrivacy(budget=NodeBudget(), run_id="1")
    state, _ = train_on_site(site, _instructions(cfg, 1), state, privacy)
    carried = {privacy.dataset_id: privacy.run_entries}
    assert privacy.dataset_id is not None and len(privacy.run_entries) == 1
    (site / LEDGER_FILE).unlink()  # e.g. restored from a backup older than the run
    again = SitePrivacy(budget=NodeBudget(), run_id="1", carried=carried)
    _, metrics = train_on_site(site, _instructions(cfg, 2), state, again)
    assert metrics["epsilon"] == pytest.approx(epsilon([ROUND] * 2, 1e-5))
    assert [e.round for e in again.run_entries] == [1, 2]


def test_node_budget_validation_and_a_budgeted_site_refuses_training_without_dp(
    site: Path,
) -> None:
    assert NodeBudget.from_node_config({}) == NodeBudget()
    assert NodeBudget.from_node_config({"privacy-budget": 8, "privacy-delta": 1e-6}) == (
        NodeBudget(8.0, 1e-6)
    )
    for bad in (
        {"privacy-budget": 0.0},
        {"privacy-budget": -1},
        {"privacy-budget": "lots"},
        {"privacy-budget": float("inf")},
        {"privacy-delta": 1.0},
        {"privacy-delta": 0},
    ):
        with pytest.raises(ConfigError, match="privacy-"):
            NodeBudget.from_node_config(bad)
    plain = RunConfig.from_run_config({"local-epochs": 1})
    with pytest.raises(ConfigError, match="without DP-SGD"):
        _train(site, plain, 1, _initial(plain), epsilon=8.0)
    with pytest.raises(ConfigError, match="not below 1/N"):
        _train(site, _cfg(**{"dp-delta": 0.5}), 1, _initial(_cfg()))


def test_run_config_dp_keys_are_validated() -> None:
    assert RunConfig().dp_config().enabled is False
    dp = _cfg(**{"num-server-rounds": 4}).dp_config()
    assert dp.enabled and dp.noise_multiplier == 1.0 and dp.planned_rounds == 4
    target = RunConfig.from_run_config({"dp-target-epsilon": 8.0}).dp_config()
    assert target.target_epsilon == 8.0 and target.noise_multiplier is None
    for bad in (
        {"dp-noise-multiplier": 1.0, "dp-target-epsilon": 2.0},
        {"dp-noise-multiplier": -1.0},
        {"dp-max-grad-norm": 0.0},
        {"dp-delta": 1.0},
        {"dp-batch-slides": 0},
        {"dp-accountant": "gdp"},
    ):
        with pytest.raises(ConfigError):
            RunConfig.from_run_config(bad)


def test_fedpath_privacy_prints_the_ledger_summary(site: Path, capsys) -> None:
    cfg = _cfg()
    _train(site, cfg, 1, _initial(cfg), epsilon=50.0)
    secret = json.loads((site / LEDGER_FILE).read_text())["secret"]
    assert main(["privacy", str(site)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "run-a" in out and "lifetime ε" in out and "one slide" in out and "left" in out
    assert f"{epsilon([ROUND], 1e-5):.3f}" in out
    assert secret not in out
    assert main(["privacy", str(site / "nowhere")]) == EXIT_USAGE


def test_a_malformed_ledger_is_refused_not_reset(site: Path) -> None:
    (site / LEDGER_FILE).write_text('{"format": "something else"}')
    cfg = _cfg()
    with pytest.raises(ConfigError, match="not a fedpath privacy ledger"):
        _train(site, cfg, 1, _initial(cfg))
    entry = LedgerEntry("r", 1, "x", "s", 1.0, 0.1, 3, 1e-5, 1.0, "rdp", 6)
    assert LedgerEntry.from_json(entry.to_json(), "here") == entry


def test_fedpath_node_passes_a_validated_budget_in_the_node_config(site: Path) -> None:
    from fedpath.client.cli_node import supernode_argv
    from fedpath.deploy.cli import build_parser

    def node_config(*extra: str) -> str:
        args = build_parser().parse_args(
            ["node", "--superlink", "h:1", "--data", str(site), "--insecure", *extra]
        )
        argv = supernode_argv(args)
        return argv[argv.index("--node-config") + 1]

    assert "privacy" not in node_config()
    assert node_config("--privacy-budget", "8", "--privacy-delta", "1e-6").endswith(
        "privacy-budget=8.0 privacy-delta=1e-06"
    )
    with pytest.raises(ConfigError, match="privacy-budget must be > 0"):
        node_config("--privacy-budget", "0")


def test_fedpath_privacy_keeps_run_keys_and_dates_whole_at_80_columns(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """At 80 columns the table cut every cell: 'run-3f9…', 'hospita…', '2026-1…'."""
    from fedpath.client.privacy_ledger import reserve_round

    monkeypatch.setenv("COLUMNS", "80")
    slides = frozenset(f"s{i}" for i in range(20))
    for run in ("run-3f9c2a1b4d5e6f70", "run-0a1b2c3d4e5f6789"):
        for rnd in (1, 2):
            entry = LedgerEntry(
                run, rnd, f"{run}{rnd}", "hospital_mainz", 1.0, 0.05, 10, 1e-5, 1.0, "rdp", 20
            )
            reserve_round(tmp_path, "ds1", slides, entry, NodeBudget(epsilon=8.0))
    # A round asked again with another model: a second release of round 2.
    again = LedgerEntry(
        "run-0a1b2c3d4e5f6789", 2, "other", "hospital_mainz", 1.0, 0.05, 10, 1e-5, 1.0, "rdp", 20
    )
    reserve_round(tmp_path, "ds1", slides, again, NodeBudget(epsilon=8.0))
    assert main(["privacy", str(tmp_path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    day = json.loads((tmp_path / LEDGER_FILE).read_text())["datasets"]["ds1"]["first_seen"][:10]
    for run in ("run-3f9c2a1b4d5e6f70", "run-0a1b2c3d4e5f6789"):
        (row,) = [line for line in out.splitlines() if run in line and "│" in line]
        assert day in row
    assert "…" not in out
    assert "run-0a1b2c3d4e5f6789: 3 releases in 2 rounds" in " ".join(out.split())


def _entry(run: str = "run-a") -> LedgerEntry:
    return LedgerEntry(
        run=run, round=1, input_sha256="0" * 64, site="site_a", noise_multiplier=1.0,
        sample_rate=1 / 3, steps=3, delta=1e-5, max_grad_norm=1.0, accountant="rdp", n_slides=6,
    )  # fmt: skip


@pytest.mark.slow
def test_a_second_writer_waits_for_the_ledger_lock_then_records(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs on one site: the second reservation waits for the first to release the lock."""
    monkeypatch.setattr(privacy_ledger, "LOCK_TIMEOUT", 10.0)
    holder = FileLock(site / privacy_ledger.LOCK_FILE, thread_local=False)
    holder.acquire()
    threading.Timer(0.3, holder.release).start()
    started = time.monotonic()
    reservation = reserve_round(site, "d1", frozenset({"s1"}), _entry(), NodeBudget())
    assert time.monotonic() - started >= 0.25, "it waited for the holder"
    assert not reservation.already_recorded
    (record,) = PrivacyLedger.load(site).datasets.values()
    assert [e.run for e in record.entries] == ["run-a"]


def test_a_ledger_locked_past_the_timeout_is_refused_with_its_path(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(privacy_ledger, "LOCK_TIMEOUT", 0.2)
    with (
        FileLock(site / privacy_ledger.LOCK_FILE),
        pytest.raises(FedpathError, match=r"privacy-ledger\.json stayed locked by another"),
    ):
        reserve_round(site, "d1", frozenset({"s1"}), _entry(), NodeBudget())
    assert not (site / LEDGER_FILE).exists(), "nothing was recorded"
