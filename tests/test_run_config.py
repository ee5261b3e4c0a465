"""The run config: Flower's flat hyphenated keys, validated, with readable errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from client.training.train_config import TrainConfig
from common.errors import ConfigError
from server.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_is_valid_and_complete() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    run_config = data["tool"]["flwr"]["app"]["config"]
    cfg = RunConfig.from_run_config(run_config)
    assert set(cfg.to_run_config()) == set(run_config), "every setting is listed in pyproject"


def test_hyphenated_keys_and_round_trip() -> None:
    cfg = RunConfig.from_run_config({"num-server-rounds": 7, "fedmix-lambda": 2.0})
    assert cfg.num_server_rounds == 7 and cfg.fedmix_lambda == 2.0
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("num-server-round", 3, "num-server-round: unknown setting"),
        ("num-server-rounds", 0, "num-server-rounds: Input should be greater than or equal to 1"),
        ("strategy", "fedprox", "strategy:"),
        ("min-fit-fraction", 1.5, "min-fit-fraction:"),
        ("labels", "tumour", "at least two distinct"),
        ("run-name", "../x", "plain directory name"),
        ("model-hidden-dim", 4, "model-hidden-dim: Input should be greater than or equal to 8"),
        ("max-train-patches", -1, "max-train-patches: Input should be greater than or equal to 0"),
    ],
)
def test_bad_values_are_reported_with_their_key(key: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_run_config({key: value}, source="run config")


def test_model_and_train_configs_follow_the_run() -> None:
    cfg = RunConfig.from_run_config({"model": "abmil", "supervision": "weak", "local-epochs": 3})
    assert cfg.model_config_for(64).kind == "abmil"
    assert cfg.model_config_for(64).feature_dim == 64
    assert cfg.model_config_for(64).hidden_dim == 512
    narrow = RunConfig.from_run_config({"model-hidden-dim": 64}).model_config_for(32)
    assert narrow.hidden_dim == 64 and narrow.feature_dim == 32
    train = cfg.train_config()
    assert train.epochs == 3 and train.supervision.mode == "weak"
    assert train.max_train_patches == TrainConfig().max_train_patches == 2048


@pytest.mark.parametrize(("value", "expected"), [(512, 512), (0, None)])
def test_max_train_patches_reaches_the_trainer_and_zero_means_every_patch(
    value: int, expected: int | None
) -> None:
    cfg = RunConfig.from_run_config({"max-train-patches": value})
    assert cfg.train_config().max_train_patches == expected
