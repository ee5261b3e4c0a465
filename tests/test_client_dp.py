"""Client-level DP at the server: clipping, noise scale σ·C·max wᵢ, accounting, run files.

The noise tests are statistical with a fixed seed: many aggregations of the same replies, and
the sample std of (noisy − noiseless aggregate) compared with the std the mechanism promises.
With 50 aggregations of a 2,000-coordinate model the estimate's relative error is ~0.2 %, so a
2 % tolerance separates the right scale from Flower's σ·C/n under FedMix weights (≥ 30 % off).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv
from opacus.accountants import RDPAccountant

from fedpath.common.errors import ConfigError
from fedpath.deploy.inprocess_grid import InProcessGrid, InProcessSite
from fedpath.server.aggregation import fedavg_weights, fedmix_weights, weighted_average
from fedpath.server.client_dp import (
    ClientDPSettings,
    ClientDPStrategy,
    ClientLevelAccountant,
    add_noise,
    client_epsilon,
    clip_update,
    noise_std,
    update_norm,
)
from fedpath.server.config import RunConfig
from fedpath.server.federated_run import build_run_strategy, run_federated
from fedpath.server.guarantee import (
    BOTH,
    CLIENT_LEVEL,
    NONE,
    SLIDE_LEVEL,
    ClientLevelSpent,
    planned_guarantee,
    run_guarantee,
)
from fedpath.server.rounds import RunFailed
from fedpath.server.run_files import read_run
from fedpath.server.strategies import FedAvgStrategy, FedMixStrategy
from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site

pytestmark = pytest.mark.usefixtures("flower_task")

SHAPES = {"a": (40, 25), "b": (1000,)}
"""2,000 float coordinates in two arrays: clipping must treat them as one flat vector."""


def _model(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _reply(node: int, arrays: dict[str, np.ndarray], n: int, loss: float) -> Message:
    instruction = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v.copy()) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": n, "train-loss": loss}),
        }
    )
    return Message(content, reply_to=instruction)


def _sites(seed: int = 0) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """A global model and three local models: updates of norm ~4.5, ~0.09 and ~9 (C = 1)."""
    rng = np.random.default_rng(seed)
    glob = _model(rng)
    locals_ = [
        {k: v + d for k, v, d in zip(glob, glob.values(), _model(rng, s).values(), strict=True)}
        for s in (0.1, 0.002, 0.2)
    ]
    return glob, locals_


COUNTS, LOSSES = (10, 40, 25), (0.9, 0.3, 0.6)


def _noise_samples(
    inner: FedAvgStrategy,
    settings: ClientDPSettings,
    repeats: int = 50,
    counts: tuple[int, ...] = COUNTS,
) -> tuple[np.ndarray, np.ndarray, ClientDPStrategy]:
    """(noisy − noiseless aggregate over ``repeats`` aggregations, the weights, the strategy)."""
    glob, locals_ = _sites()
    strategy = ClientDPStrategy(inner, settings, rng=np.random.default_rng(1234))
    clipped = [clip_update(loc, glob, settings.clip_norm)[0] for loc in locals_]
    samples = []
    for r in range(1, repeats + 1):
        replies = [
            _reply(7 + i, loc, n, loss)
            for i, (loc, n, loss) in enumerate(zip(locals_, counts, LOSSES, strict=True))
        ]
        strategy.begin_aggregation(glob)
        arrays, _ = strategy.aggregate_train(r, replies)
        weights = np.array([strategy.last_weights[7 + i] for i in range(3)])
        noiseless = weighted_average(clipped, weights)
        samples.append(
            np.concatenate(
                [
                    (arrays[k].numpy().astype(np.float64) - noiseless[k].astype(np.float64)).ravel()
                    for k in SHAPES
                ]
            )
        )
    return np.concatenate(samples), weights, strategy


# -- clipping ----------------------------------------------------------------------------


def test_each_update_is_clipped_to_c_as_one_flat_vector() -> None:
    glob, locals_ = _sites()
    c = 1.0
    for local in locals_:
        before = update_norm(local, glob)
        clipped, reported = clip_update(local, glob, c)
        assert reported == pytest.approx(before)
        after = update_norm(clipped, glob)
        assert after == pytest.approx(min(before, c), rel=1e-5)
        assert all(clipped[k].dtype == np.float32 for k in SHAPES)
        # the direction is kept: clipped Δ is a positive multiple of Δ
        d0 = np.concatenate([(local[k] - glob[k]).ravel() for k in SHAPES]).astype(np.float64)
        d1 = np.concatenate([(clipped[k] - glob[k]).ravel() for k in SHAPES]).astype(np.float64)
        assert np.dot(d0, d1) / (np.linalg.norm(d0) * np.linalg.norm(d1)) == pytest.approx(1.0)
    assert update_norm(locals_[0], glob) > c and update_norm(locals_[1], glob) < c


def test_an_update_below_c_is_left_unchanged() -> None:
    glob, locals_ = _sites()
    small = locals_[1]
    assert update_norm(small, glob) < 1.0
    clipped, _ = clip_update(small, glob, 1.0)
    for k in SHAPES:
        np.testing.assert_array_equal(clipped[k], small[k])


def test_clipping_matches_flowers_server_side_fixed_clipping() -> None:
    glob, locals_ = _sites()
    for local in locals_:
        ours, _ = clip_update(local, glob, 1.0)
        theirs = [local[k].copy() for k in SHAPES]
        compute_clip_model_update(theirs, [glob[k] for k in SHAPES], 1.0)
        for k, t in zip(SHAPES, theirs, strict=True):
            np.testing.assert_allclose(ours[k], t, rtol=1e-5, atol=1e-6)


def test_integer_arrays_take_the_global_value_and_get_no_noise() -> None:
    glob = {"w": np.zeros(3, np.float32), "steps": np.array([5], np.int64)}
    local = {"w": np.full(3, 10.0, np.float32), "steps": np.array([9], np.int64)}
    clipped, norm = clip_update(local, glob, 1.0)
    assert norm == pytest.approx(math.sqrt(300.0))
    assert clipped["steps"].tolist() == [5]
    noisy = add_noise(clipped, 1.0, np.random.default_rng(0))
    assert noisy["steps"].tolist() == [5] and noisy["w"].dtype == np.float32


def test_replies_with_other_arrays_than_the_global_model_are_refused() -> None:
    glob, locals_ = _sites()
    with pytest.raises(ValueError, match="arrays"):
        clip_update({"a": locals_[0]["a"]}, glob, 1.0)
    with pytest.raises(ValueError, match="shape"):
        clip_update({"a": locals_[0]["a"], "b": np.zeros(3, np.float32)}, glob, 1.0)


def test_aggregation_without_the_global_model_is_refused() -> None:
    strategy = ClientDPStrategy(FedAvgStrategy(), ClientDPSettings(1.0, 1.0, 1e-5))
    _, locals_ = _sites()
    with pytest.raises(RuntimeError, match="begin_aggregation"):
        strategy.aggregate_train(1, [_reply(1, locals_[0], 10, 0.5)])


# -- noise scale -------------------------------------------------------------------------


def test_noise_has_std_sigma_c_over_n_with_equal_fedavg_weights() -> None:
    settings = ClientDPSettings(clip_norm=1.0, noise_multiplier=1.3, delta=1e-5)
    noise, weights, _ = _noise_samples(FedAvgStrategy(), settings, counts=(20, 20, 20))
    np.testing.assert_allclose(weights, [1 / 3] * 3)
    expected = compute_stdv(1.3, 1.0, 3)  # Flower's σ·C/n
    assert expected == pytest.approx(noise_std(1.0, 1.3, weights))
    assert abs(noise.mean()) < 4 * expected / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(expected, rel=0.02)


def test_fedmix_noise_is_scaled_to_the_largest_weight() -> None:
    settings = ClientDPSettings(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    noise, weights, strategy = _noise_samples(FedMixStrategy(lam=10.0, beta=1.5), settings)
    np.testing.assert_allclose(weights, fedmix_weights(COUNTS, LOSSES, 10.0, 1.5), rtol=1e-6)
    expected = 1.0 * 1.0 * weights.max()
    assert weights.max() > 0.45  # FedMix favours the high-loss site well beyond 1/3
    assert noise.std() == pytest.approx(expected, rel=0.02)
    assert noise.std() > 1.3 * compute_stdv(1.0, 1.0, 3), "Flower's σ·C/n would under-noise"
    logged = strategy.round_log()["client_dp"]
    assert logged["noise_std"] == pytest.approx(expected)
    assert logged["max_weight"] == pytest.approx(weights.max())


def test_fedavg_with_unequal_slide_counts_is_scaled_to_the_largest_weight() -> None:
    settings = ClientDPSettings(clip_norm=0.5, noise_multiplier=2.0, delta=1e-5)
    noise, weights, _ = _noise_samples(FedAvgStrategy(), settings)
    np.testing.assert_allclose(weights, fedavg_weights(COUNTS))
    assert noise.std() == pytest.approx(2.0 * 0.5 * 40 / 75, rel=0.02)


def test_noise_std_refuses_weights_that_do_not_sum_to_one() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        noise_std(1.0, 1.0, [0.5, 0.2])


# -- accounting --------------------------------------------------------------------------


def test_epsilon_grows_with_rounds_and_matches_opacus() -> None:
    settings = ClientDPSettings(clip_norm=1.0, noise_multiplier=1.5, delta=1e-5)
    _, _, strategy = _noise_samples(FedAvgStrategy(), settings, repeats=1)
    glob, locals_ = _sites()
    reference = RDPAccountant()
    reference.step(noise_multiplier=1.5, sample_rate=1.0)
    eps = [strategy.round_log()["client_dp"]["epsilon"]]
    for r in range(2, 6):
        strategy.begin_aggregation(glob)
        strategy.aggregate_train(
            r, [_reply(1, locals_[0], 10, 0.5), _reply(2, locals_[2], 10, 0.5)]
        )
        reference.step(noise_multiplier=1.5, sample_rate=1.0)
        logged = strategy.round_log()["client_dp"]
        assert logged["releases"] == r
        assert logged["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-12)
        eps.append(logged["epsilon"])
    assert all(b > a for a, b in itertools.pairwise(eps))
    assert eps[-1] == pytest.approx(client_epsilon(1.5, 5, 1e-5), rel=1e-12)


def test_epsilon_of_the_gaussian_mechanism_is_what_rdp_gives_by_hand() -> None:
    """One release with σ: RDP α/(2σ²); Opacus' conversion ε = min over α of
    rdp + log((α−1)/α) − (log δ + log α)/(α−1) (Balle et al. 2020)."""
    sigma, delta, rounds = 2.0, 1e-5, 3
    alphas = RDPAccountant.DEFAULT_ALPHAS
    by_hand = min(
        rounds * a / (2 * sigma**2)
        + math.log((a - 1) / a)
        - (math.log(delta) + math.log(a)) / (a - 1)
        for a in alphas
    )
    assert client_epsilon(sigma, rounds, delta) == pytest.approx(by_hand, rel=1e-9)


def test_accountant_survives_a_checkpoint_round_trip() -> None:
    settings = ClientDPSettings(clip_norm=1.0, noise_multiplier=1.0, delta=1e-6)
    _, _, strategy = _noise_samples(FedMixStrategy(), settings, repeats=3)
    state = json.loads(json.dumps(strategy.state()))  # checkpoints hold plain JSON types
    assert state["name"] == "fedmix" and state["lambda"] == 10.0
    resumed = ClientDPStrategy(FedMixStrategy(), settings)
    resumed.load_state(state)
    assert resumed.accountant.releases == 3
    assert resumed.accountant.epsilon() == pytest.approx(strategy.accountant.epsilon())
    with pytest.raises(ConfigError, match="no client-level DP accountant"):
        ClientDPStrategy(FedMixStrategy(), settings).load_state({"name": "fedmix"})
    with pytest.raises(ConfigError, match="invalid"):
        ClientLevelAccountant(1e-5, [[0.0, 1.0, 2]])


def test_no_release_costs_nothing() -> None:
    assert ClientLevelAccountant(1e-5).epsilon() == 0.0
    strategy = ClientDPStrategy(FedAvgStrategy(), ClientDPSettings(1.0, 1.0, 1e-5))
    strategy.begin_aggregation(_sites()[0])
    assert strategy.aggregate_train(1, []) == (None, None)
    assert strategy.accountant.releases == 0 and strategy.round_log() == {}


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("client-dp-noise-multiplier", 0.0, "client-dp-noise-multiplier: Input should be greater"),
        ("client-dp-noise-multiplier", -1.0, "client-dp-noise-multiplier:"),
        ("client-dp-clip-norm", 0.0, "client-dp-clip-norm: Input should be greater than 0"),
        ("client-dp-clip-norm", -0.5, "client-dp-clip-norm:"),
        ("client-dp-delta", 0.0, "client-dp-delta: Input should be greater than 0"),
        ("client-dp-delta", 1.0, "client-dp-delta: Input should be less than 1"),
        ("client-dp-delta", 2.0, "client-dp-delta:"),
        ("client-dp", "on", "client-dp: Input should be 'off' or 'fixed-clipping'"),
    ],
)
def test_bad_client_dp_settings_are_refused_by_key(key: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_run_config({"client-dp": "fixed-clipping", key: value})


def test_settings_follow_the_run_config() -> None:
    off = RunConfig.from_run_config({})
    assert ClientDPSettings.from_run_config(off) is None
    assert type(build_run_strategy(off)) is FedMixStrategy
    cfg = RunConfig.from_run_config(
        {
            "client-dp": "fixed-clipping",
            "client-dp-clip-norm": 0.3,
            "client-dp-noise-multiplier": 1.1,
            "client-dp-delta": 1e-6,
            "strategy": "fedavg",
        }
    )
    assert ClientDPSettings.from_run_config(cfg) == ClientDPSettings(0.3, 1.1, 1e-6)
    strategy = build_run_strategy(cfg)
    assert isinstance(strategy, ClientDPStrategy) and strategy.name == "fedavg"
    with pytest.raises(ConfigError, match="client-dp-noise-multiplier"):
        ClientDPSettings(1.0, 0.0, 1e-5)


# -- the guarantee statement -------------------------------------------------------------


def _spent(releases: int = 2) -> ClientLevelSpent:
    return ClientLevelSpent(1.0, 1.0, 1e-5, client_epsilon(1.0, releases, 1e-5), releases)


def _record(replied: list[str], eps: dict[str, float]) -> dict:
    return {
        "replied": replied,
        "privacy": {s: {"epsilon": e, "delta": 1e-5} for s, e in eps.items()},
    }


def test_guarantee_kinds() -> None:
    dp_rounds = [_record(["a", "b"], {"a": 1.0, "b": 2.0}), _record(["a"], {"a": 1.5})]
    plain = [_record(["a", "b"], {})]
    assert run_guarantee(plain, None)["privacy"]["guarantee"] == NONE
    assert run_guarantee(plain, None)["privacy_guarantee"].startswith("none:")
    slide = run_guarantee(dp_rounds, None)
    assert slide["privacy"]["guarantee"] == SLIDE_LEVEL
    assert "a ε = 1.5" in slide["privacy_guarantee"]
    client = run_guarantee(plain, _spent())
    assert client["privacy"]["guarantee"] == CLIENT_LEVEL
    assert client["privacy"]["client_level"]["accountant"].startswith("Opacus RDPAccountant")
    assert client["privacy_guarantee"].startswith(CLIENT_LEVEL)
    both = run_guarantee(dp_rounds, _spent())
    assert both["privacy"]["guarantee"] == BOTH and both["privacy_guarantee"].startswith("both:")
    partial = run_guarantee([_record(["a", "b"], {"a": 1.0})], None)
    assert partial["privacy"]["guarantee"] == NONE
    assert "not by b" in partial["privacy_guarantee"]
    nothing = run_guarantee([], _spent(0))
    assert (
        nothing["privacy"]["guarantee"] == NONE
        and "nothing was released" in (nothing["privacy_guarantee"])
    )


def test_planned_guarantee() -> None:
    assert planned_guarantee(None)["privacy"]["guarantee"] == NONE
    plan = planned_guarantee(_spent(3))
    assert plan["privacy"]["guarantee"] == CLIENT_LEVEL
    assert plan["privacy_guarantee"].startswith("planned: " + CLIENT_LEVEL)
    assert "once all 3 round(s)" in plan["privacy_guarantee"]
    assert planned_guarantee(_spent(3), slide_level=True)["privacy"]["guarantee"] == BOTH


# -- through the round loop --------------------------------------------------------------


@pytest.fixture(scope="module")
def site_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sites")
    spec = SyntheticSiteSpec(n_slides=10, feature_dim=16, patches=(10, 30))
    return {name: write_synthetic_site(root / name, spec, seed=i) for i, name in enumerate("ab")}


def _dp_grid(site_dirs: dict[str, Path], silent: set[int] = frozenset()) -> InProcessGrid:
    return InProcessGrid(
        {
            10 + i: InProcessSite(path, f"site_{n}", silent_rounds=set(silent))
            for i, (n, path) in enumerate(site_dirs.items())
        }
    )


def _dp_cfg(tmp_path: Path, **overrides: object) -> RunConfig:
    base = {
        "num-server-rounds": 2,
        "local-epochs": 1,
        "lr": 1e-3,
        "runs-dir": str(tmp_path / "runs"),
        "run-name": "dp",
        "connect-timeout": 1.0,
        "client-dp": "fixed-clipping",
        "client-dp-clip-norm": 0.5,
        "client-dp-noise-multiplier": 1.2,
    }
    return RunConfig.from_run_config({**base, **overrides})


@pytest.mark.slow
def test_two_round_run_with_client_level_dp_states_its_guarantee(site_dirs, tmp_path) -> None:
    run_dir = run_federated(_dp_grid(site_dirs), _dp_cfg(tmp_path), flwr_run_id=5)
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    eps = [r["client_dp"]["epsilon"] for r in rounds]
    assert [r["client_dp"]["releases"] for r in rounds] == [1, 2]
    assert eps == pytest.approx([client_epsilon(1.2, k, 1e-5) for k in (1, 2)])
    for r in rounds:
        assert r["client_dp"]["noise_std"] == pytest.approx(1.2 * 0.5 * max(r["weights"].values()))
    final = json.loads((run_dir / "final.json").read_text())
    assert final["status"] == "completed"
    assert final["privacy"]["guarantee"] == CLIENT_LEVEL
    assert final["privacy_guarantee"].startswith(CLIENT_LEVEL)
    assert f"ε = {eps[-1]:.3g}" in final["privacy_guarantee"]
    assert final["privacy"]["client_level"]["epsilon"] == pytest.approx(eps[-1])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["privacy"]["guarantee"] == CLIENT_LEVEL
    assert config["privacy_guarantee"].startswith("planned: " + CLIENT_LEVEL)
    run = read_run(run_dir)
    assert run.rounds[-1].client_dp is not None and run.final.privacy_guarantee
    page = (run_dir / "report.html").read_text()
    assert "ε of the federation by round" in page and "opacus-rdp" in page


@pytest.mark.slow
def test_a_resumed_run_continues_the_federations_epsilon(site_dirs, tmp_path) -> None:
    """Every site is silent in round 3, so the run fails after 2 rounds; the resume must add
    round 3 to the ε of rounds 1-2 (from the checkpoint), not start the accountant at 0."""
    cfg = _dp_cfg(tmp_path, **{"num-server-rounds": 3, "max-round-attempts": 1})
    with pytest.raises(RunFailed):
        run_federated(_dp_grid(site_dirs, {3}), cfg, flwr_run_id=6)
    run_dir = tmp_path / "runs" / "dp"
    failed = json.loads((run_dir / "final.json").read_text())
    assert failed["status"] == "failed" and failed["privacy"]["guarantee"] == CLIENT_LEVEL
    assert failed["privacy"]["client_level"]["rounds"] == 2
    resumed = RunConfig.from_run_config({"resume": str(run_dir)})
    run_federated(_dp_grid(site_dirs), resumed, flwr_run_id=7)
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["client_dp"]["releases"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["client_dp"]["epsilon"] == pytest.approx(client_epsilon(1.2, 3, 1e-5))
    final = json.loads((run_dir / "final.json").read_text())
    assert final["status"] == "completed" and final["privacy"]["client_level"]["rounds"] == 3
