"""The run config: Flower's flat hyphenated keys, validated, with readable errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedpath.common.errors import ConfigError
from fedpath.common.train_config import TrainConfig
from fedpath.server.config import RunConfig

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


def test_errors_name_each_key_as_the_user_wrote_it() -> None:
    """Python-style keys are accepted too, and an error names them as written, not rewritten
    into the hyphenated form the user never typed."""
    assert RunConfig.from_run_config({"num_server_rounds": 5}).num_server_rounds == 5
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config({"num_server_round": 3, "local-epochs": "x"})
    lines = str(info.value).splitlines()
    assert "run config: num_server_round: unknown setting (check the spelling)" in lines
    assert any(line.startswith("run config: local-epochs: Input should be") for line in lines)


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


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("num-server-rounds", 1e9, "num-server-rounds: Input should be less than or equal to"),
        ("fedmix-lambda", float("inf"), "fedmix-lambda: Input should be a finite number"),
        ("fedmix-beta", float("nan"), "fedmix-beta: Input should be a finite number"),
        ("round-timeout", 1e12, "round-timeout: Input should be less than or equal to"),
        ("lr", float("inf"), "lr: Input should be a finite number"),
        ("local-epochs", float("inf"), "local-epochs: Input should be a finite number"),
        ("seed", 2**64, "seed: Input should be less than or equal to"),
    ],
)
def test_huge_and_non_finite_numbers_are_refused_with_their_key(
    key: str, value: object, needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_run_config({key: value}, source="-c options")


def test_every_numeric_setting_has_a_finite_upper_bound() -> None:
    """A new numeric key without a bound would let a typo like 1e9 reach the SuperLink."""
    import annotated_types

    for name, field in RunConfig.model_fields.items():
        if field.annotation not in (int, float):
            continue
        upper = [
            m for m in field.metadata if isinstance(m, annotated_types.Le | annotated_types.Lt)
        ]
        assert upper, f"{name} has no upper bound"
    assert RunConfig.model_config.get("allow_inf_nan") is False


def test_fedpath_run_refuses_bad_numbers_before_contacting_the_superlink(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedpath.deploy.cli import main

    home = tmp_path / "home"
    for override in ("num-server-rounds=1e9", "fedmix-lambda=inf"):
        code = main(
            ["run", "--superlink", "127.0.0.1:9", "--insecure", "--flwr-home", str(home),
             "-c", override]
        )  # fmt: skip
        out = capsys.readouterr().out
        assert code == 2, out
        assert override.split("=")[0] in out
    assert not home.exists(), "nothing may be written or submitted for a refused config"


def test_compose_coordinator_refuses_bad_numbers_before_waiting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedpath.deploy.coordinator import main

    key = tmp_path / "a.pub"
    argv = ["--superlink", "127.0.0.1:9", "--ca", str(tmp_path / "ca.pem"), "--app", "."]
    code = main([*argv, "--set", "fedmix-lambda=inf", "--connect-timeout", "600", str(key)])
    assert code == 2
    assert "fedmix-lambda: Input should be a finite number" in capsys.readouterr().err
