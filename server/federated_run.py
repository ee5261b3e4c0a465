"""One federated run end to end: run directory, resume, gate, rounds, final test, report.

Separate from ``fedpath.server.app`` (the Flower entry point) so it runs against any ``Grid``: the
SuperLink's in deployment, Flower's simulation engine, or an in-process grid in tests.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from fedpath.common import __version__
from fedpath.common.errors import ConfigError, FedpathError
from fedpath.server.checkpoints import latest_checkpoint, load_checkpoint
from fedpath.server.client_dp import ClientDPSettings, ClientDPStrategy, client_epsilon
from fedpath.server.config import RunConfig
from fedpath.server.guarantee import ClientLevelSpent, planned_guarantee, run_guarantee
from fedpath.server.rounds import Federation, RunFailed, harmonised_summary
from fedpath.server.run_log import FINAL_FILE, METRICS_FILE, RUN_DIR_PREFIX, RunLog
from fedpath.server.strategies import FedAvgStrategy, build_strategy

__all__ = ["RunFailed", "build_run_strategy", "initial_arrays", "resolve_run_dir", "run_federated"]

logger = logging.getLogger(__name__)


def resolve_run_dir(cfg: RunConfig, flwr_run_id: int) -> Path:
    """The resumed directory, or a new one under ``runs-dir``."""
    if cfg.resume:
        return Path(cfg.resume).expanduser().resolve()
    return (cfg.runs_root() / (cfg.run_name or f"flwr-{flwr_run_id}")).resolve()


def initial_arrays(cfg: RunConfig, feature_dim: int) -> dict[str, np.ndarray]:
    """The seeded initial global model (every site starts from these exact weights)."""
    import torch

    from fedpath.common.mil.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model_config_for(feature_dim))
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def build_run_strategy(cfg: RunConfig) -> FedAvgStrategy:
    """The run's aggregation strategy, wrapped with client-level DP when ``client-dp`` is on."""
    strategy = build_strategy(cfg.strategy, cfg.fedmix_lambda, cfg.fedmix_beta)
    settings = ClientDPSettings.from_run_config(cfg)
    return strategy if settings is None else ClientDPStrategy(strategy, settings)


def _client_spent(strategy: FedAvgStrategy) -> ClientLevelSpent | None:
    """What the client-level mechanism has spent so far (``None`` when it is off)."""
    if not isinstance(strategy, ClientDPStrategy):
        return None
    s = strategy.settings
    return ClientLevelSpent(
        clip_norm=s.clip_norm,
        noise_multiplier=s.noise_multiplier,
        delta=s.delta,
        epsilon=strategy.accountant.epsilon(),
        releases=strategy.accountant.releases,
    )


def _resume_config(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """The configuration recorded in the run being resumed (it decides the final round)."""
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"resume: {run_dir} is not a fedpath run directory (no config.json)")
    recorded = RunLog(run_dir).read_config()["run_config"]
    recorded = {**recorded, "resume": str(run_dir)}
    saved = RunConfig.from_run_config(recorded, source=f"{run_dir / 'config.json'}")
    given = cfg.to_run_config()
    for key, value in saved.to_run_config().items():
        if key not in ("resume", "run-name", "runs-dir") and given.get(key) != value:
            logger.warning(f"resume: using the recorded {key}={value!r}, not {given.get(key)!r}")
    return saved


def run_federated(
    grid: Grid,
    cfg: RunConfig,
    *,
    flwr_run_id: int,
) -> Path:
    """Run (or resume) the federation; return the run directory.

    Raises ``RunFailed``, ``HarmonisationError`` or ``ConfigError`` when the run cannot
    complete, after recording the reason in ``final.json``. Progress goes to this module's
    logger and :mod:`fedpath.server.rounds`'s (the ServerApp forwards both to Flower's log).
    """
    run_dir = resolve_run_dir(cfg, flwr_run_id)
    if cfg.resume:
        cfg = _resume_config(cfg, run_dir)
    elif (run_dir / METRICS_FILE).exists() or (run_dir / FINAL_FILE).exists():
        raise ConfigError(
            f"run directory {run_dir} already holds a run; choose another run-name, or "
            f'continue it with -c resume="{run_dir}"'
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    # The first line of the ServerApp's log: `fedpath run` reads it (through `flwr log`) to
    # find this directory, whose relative runs-dir only the ServerApp can resolve.
    logger.info(f"{RUN_DIR_PREFIX}{run_dir}")
    log = RunLog(run_dir)
    strategy = build_run_strategy(cfg)
    federation = Federation(grid=grid, cfg=cfg, log=log, strategy=strategy)
    completed = 0
    try:
        federation.gate()
        start_round, arrays = 1, initial_arrays(cfg, federation.feature_dim())
        if cfg.resume:
            start_round, arrays = _resume_state(run_dir, log, arrays, strategy)
        else:
            log.write_config(_config_record(cfg, federation, flwr_run_id))
        completed = start_round - 1
        arrays = federation.run(arrays, start_round)
        completed = cfg.num_server_rounds
        final = federation.final_test(arrays)
    except FedpathError as exc:
        completed = len(log.rounds)
        log.write_final(
            {
                "status": "failed",
                "reason": str(exc),
                "rounds_completed": completed,
                "num_rounds": cfg.num_server_rounds,
                "test": {},
                "global_test": {},
                **run_guarantee(log.rounds, _client_spent(strategy)),
            }
        )
        logger.info(f"run failed after {completed} round(s): {exc}")
        raise
    log.write_final(
        {
            "status": "completed",
            "reason": None,
            "rounds_completed": completed,
            "num_rounds": cfg.num_server_rounds,
            **final,
            **run_guarantee(log.rounds, _client_spent(strategy)),
        }
    )
    _render_report(run_dir)
    logger.info(f"run completed: {run_dir}")
    return run_dir


def _config_record(cfg: RunConfig, federation: Federation, flwr_run_id: int) -> dict[str, Any]:
    return {
        "fedpath_version": __version__,
        "run_config": cfg.to_run_config(),
        "flwr_run_id": flwr_run_id,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_config": cfg.model_config_for(federation.feature_dim()).model_dump(mode="json"),
        "train_config": cfg.train_config().model_dump(mode="json"),
        "sites": harmonised_summary(federation.site_list()),
        **planned_guarantee(_planned_client(cfg), slide_level=cfg.dp_config().enabled),
    }


def _planned_client(cfg: RunConfig) -> ClientLevelSpent | None:
    """The client-level ε once every configured round is aggregated (``None`` when off)."""
    settings = ClientDPSettings.from_run_config(cfg)
    if settings is None:
        return None
    return ClientLevelSpent(
        clip_norm=settings.clip_norm,
        noise_multiplier=settings.noise_multiplier,
        delta=settings.delta,
        epsilon=client_epsilon(settings.noise_multiplier, cfg.num_server_rounds, settings.delta),
        releases=cfg.num_server_rounds,
    )


def _resume_state(
    run_dir: Path,
    log: RunLog,
    fresh: dict[str, np.ndarray],
    strategy: FedAvgStrategy,
) -> tuple[int, dict[str, np.ndarray]]:
    """(next round, arrays) from the latest checkpoint; the fresh model when there is none.

    The strategy continues from the checkpoint's state too: client-level DP's accountant must
    carry the ε of the rounds already released.
    """
    path = latest_checkpoint(run_dir)
    log.clear_final()
    if path is None:
        log.load_rounds(up_to=0)
        logger.info(f"resume: {run_dir} has no checkpoint yet; starting at round 1")
        return 1, fresh
    checkpoint = load_checkpoint(path)
    if set(checkpoint.arrays) != set(fresh):
        raise ConfigError(f"{path}: its arrays do not match the run's model")
    strategy.load_state(checkpoint.strategy)
    log.load_rounds(up_to=checkpoint.server_round)
    logger.info(f"resume: continuing after round {checkpoint.server_round} from {path.name}")
    return checkpoint.server_round + 1, checkpoint.arrays


def _render_report(run_dir: Path) -> None:
    """The HTML report is a convenience: a rendering problem must not fail a finished run."""
    from fedpath.server.report.page import render_report  # matplotlib: only once the run ended

    try:
        path = render_report(run_dir)
    except (FedpathError, OSError, ValueError) as exc:
        logger.info(f"report could not be rendered ({exc}); run `fedpath report {run_dir}`")
        return
    logger.info(f"report: {path}")
