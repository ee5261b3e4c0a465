"""The settings of one federated run, validated from Flower's run config.

A run is configured in ``[tool.flwr.app.config]`` of ``pyproject.toml`` and overridden with
``flwr run . CONN -c 'key=value'``. Flower hands the ServerApp a flat dict with hyphenated
keys (the fields' aliases); this model turns it into typed fields, rejects unknown keys (a
misspelt ``num-server-round`` must not silently run the default) and builds the model and
trainer configs every site receives.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from fedpath.common.configbase import StrictModel
from fedpath.common.configio import format_validation_error
from fedpath.common.dp_config import DPConfig
from fedpath.common.errors import ConfigError
from fedpath.common.mil.config import ModelConfig, SupervisionConfig
from fedpath.common.train_config import TrainConfig
from fedpath.server.replies import DEFAULT_POLL_INTERVAL

__all__ = ["RunConfig"]

DAY = 86_400.0
"""Upper bound of every wait: a longer one is a typo (or a unit mix-up), never a plan."""


def _hyphenated(name: str) -> str:
    """A field's key in Flower's run config: ``num_server_rounds`` is ``num-server-rounds``."""
    return name.replace("_", "-")


class RunConfig(StrictModel):
    """One federated run: rounds, strategy, local training, robustness bounds, outputs.

    Every number has a finite upper bound: ``num-server-rounds=1e9`` or ``fedmix-lambda=inf``
    would be submitted and run (or hang) for ever, so they are refused here, before anything
    reaches the SuperLink, with the key named. No float may be NaN or infinite.
    """

    # The hyphenated keys are the fields' aliases, so pydantic names a bad key in its errors as
    # the user wrote it; Python code still builds and reads fields by name.
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        alias_generator=_hyphenated,
        validate_by_alias=True,
        validate_by_name=True,
    )

    num_server_rounds: int = Field(3, ge=1, le=10_000, description="rounds of train + evaluate")
    strategy: Literal["fedavg", "fedmix"] = "fedmix"
    fedmix_lambda: float = Field(10.0, ge=0, le=1000, description="λ of FedMix (paper: 10 or 2)")
    fedmix_beta: float = Field(1.5, gt=0, le=20, description="β of FedMix (paper: 1.5 or 3)")

    model: Literal["abmil", "clam_sb", "clam_mb"] = "clam_sb"
    model_size: Literal["small", "big"] = "small"
    model_hidden_dim: int = Field(
        512,
        ge=8,
        le=8192,
        description="width of the per-patch embedding h' (fewer parameters: less DP noise "
        "in total for the same per-coordinate noise)",
    )
    supervision: Literal["weak", "mixed"] = "mixed"
    local_epochs: int = Field(2, ge=1, le=1000, description="epochs each site trains per round")
    lr: float = Field(2e-4, gt=0, le=1.0)
    weight_decay: float = Field(1e-5, ge=0, le=1.0)
    max_train_patches: int = Field(
        2048,
        ge=0,
        le=10_000_000,
        description="patches a local training step samples from a larger slide, afresh every "
        "epoch (0: every patch; validation always scores every patch)",
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="seeds the initial model and every site's sampling"
    )
    labels: str = Field("normal,tumour", description="comma-separated slide labels, in order")
    split_folds: int = Field(5, ge=2, le=100)
    split_fold: int = Field(0, ge=0, le=99)

    min_sites: int = Field(
        2, ge=1, le=10_000, description="sites that must be connected to start a round"
    )
    sample_fraction: float = Field(1.0, gt=0, le=1, description="share of sites asked per round")
    min_fit_fraction: float = Field(
        0.5, gt=0, le=1, description="share of the asked sites that must answer a round"
    )
    connect_timeout: float = Field(
        300.0,
        gt=0,
        le=7 * DAY,
        description="seconds to wait for min-sites to connect before giving up",
    )
    round_timeout: float = Field(
        900.0, gt=0, le=7 * DAY, description="seconds a round waits for replies"
    )
    query_timeout: float = Field(
        120.0, gt=0, le=DAY, description="seconds for the harmonisation query"
    )
    reply_poll_interval: float = Field(
        DEFAULT_POLL_INTERVAL,
        gt=0,
        le=10,
        description="seconds between pulls for replies (Flower's own loop waits 3 s)",
    )
    max_round_attempts: int = Field(
        3, ge=1, le=100, description="tries of one round before the run fails"
    )
    runs_dir: str = Field(
        "runs", description="where run directories are created (relative: to the ServerApp's cwd)"
    )
    run_name: str = Field("", description="run directory name (default: flwr-<run id>)")
    resume: str = Field("", description="run directory to continue from its last checkpoint")
    simulation_data: str = Field(
        "",
        description="simulation only: folder of prepared sites site_000, site_001, ...; "
        "virtual SuperNode i trains on site_<i> (real SuperNodes use their node config)",
    )

    # Client-level DP (issue 6.3, ``server.client_dp``): each site's update is clipped to norm
    # C at the server and the aggregate gets Gaussian noise of std σ·C·max wᵢ.
    client_dp: Literal["off", "fixed-clipping"] = Field(
        "off", description="client-level DP at the server: off, or fixed-clipping (clip + noise)"
    )
    client_dp_clip_norm: float = Field(
        1.0, gt=0, le=1e6, description="C: L2 bound of each site's model update"
    )
    client_dp_noise_multiplier: float = Field(
        1.0, gt=0, le=1e4, description="σ: noise std in units of the sensitivity"
    )
    client_dp_delta: float = Field(
        1e-5, gt=0, lt=1, description="δ at which the federation's ε is reported"
    )

    # Slide-level DP-SGD at every site (issue 6.1, ``fedpath.client.training.private_trainer``): one
    # slide = one privacy unit. Off unless a noise multiplier or a target ε is set (> 0).
    dp_noise_multiplier: float = Field(
        0.0, ge=0, le=1e4, description="σ of slide-level DP-SGD (0 = off)"
    )
    dp_target_epsilon: float = Field(
        0.0,
        ge=0,
        le=1e4,
        description="ε each site reaches after num-server-rounds; σ is solved (0 = off)",
    )
    dp_max_grad_norm: float = Field(
        1.0, gt=0, le=1e6, description="C: every slide's gradient is clipped to it"
    )
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="δ of each site's (ε, δ); < 1/N")
    dp_batch_slides: int = Field(
        16, ge=1, le=100_000, description="expected Poisson batch of slides"
    )
    dp_accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant")

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        names = self.label_names
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"labels must name at least two distinct classes, got {names}")
        if self.split_fold >= self.split_folds:
            raise ValueError(f"split-fold {self.split_fold} >= split-folds {self.split_folds}")
        if self.run_name and (
            "/" in self.run_name or self.run_name.startswith(".") or "\\" in self.run_name
        ):
            raise ValueError(f"run-name must be a plain directory name, got {self.run_name!r}")
        if self.dp_noise_multiplier > 0 and self.dp_target_epsilon > 0:
            raise ValueError(
                "set dp-noise-multiplier or dp-target-epsilon, not both (σ is solved from ε)"
            )
        return self

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.labels.split(",") if s.strip())

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, Any], source: str = "run config"
    ) -> RunConfig:
        """Validate Flower's flat run config; ``ConfigError`` lists every problem."""
        try:
            return cls.model_validate({str(k): v for k, v in run_config.items()})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from exc

    def to_run_config(self) -> dict[str, Any]:
        """The flat, hyphenated form (what ``config.json`` records and resume compares)."""
        return self.model_dump(mode="json", by_alias=True)

    def model_config_for(self, feature_dim: int) -> ModelConfig:
        return ModelConfig(
            kind=self.model,
            size=self.model_size,
            feature_dim=feature_dim,
            hidden_dim=self.model_hidden_dim,
            n_classes=len(self.label_names),
        )

    def train_config(self) -> TrainConfig:
        """The trainer settings of one round's local training (no early stopping inside)."""
        return TrainConfig(
            epochs=self.local_epochs,
            lr=self.lr,
            weight_decay=self.weight_decay,
            max_train_patches=self.max_train_patches,  # 0: every patch (TrainConfig)
            seed=self.seed,
            supervision=SupervisionConfig(mode=self.supervision),
        )

    def dp_config(self) -> DPConfig:
        """The slide-level DP-SGD settings every site receives (disabled when σ and ε are 0)."""
        enabled = self.dp_noise_multiplier > 0 or self.dp_target_epsilon > 0
        return DPConfig(
            enabled=enabled,
            noise_multiplier=self.dp_noise_multiplier or None,
            target_epsilon=self.dp_target_epsilon or None,
            max_grad_norm=self.dp_max_grad_norm,
            delta=self.dp_delta,
            expected_batch_slides=self.dp_batch_slides,
            accountant=self.dp_accountant,
            planned_rounds=self.num_server_rounds,
        )

    def runs_root(self) -> Path:
        return Path(self.runs_dir).expanduser()
