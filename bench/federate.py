"""Run a whole federation in-process and load the model it ended with.

The benchmarks that compare federated training with other arms run the real ServerApp round
loop and every site's real ClientApp; only the transport is in-process (``InProcessGrid``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedpath.common.mil.models import MILModel, build_model
from fedpath.deploy.inprocess_grid import InProcessGrid, InProcessSite, task_identity
from fedpath.server.checkpoints import latest_checkpoint, load_checkpoint
from fedpath.server.config import RunConfig
from fedpath.server.federated_run import run_federated

__all__ = ["FederatedRun", "run_and_load"]


@dataclass(frozen=True)
class FederatedRun:
    """A completed run: its final model, its ``final.json`` and its wall time."""

    model: MILModel
    final: Mapping[str, Any]
    seconds: float
    config: RunConfig


def run_and_load(
    sites: Mapping[str, Path], run_config: Mapping[str, Any], feature_dim: int, label: str
) -> FederatedRun:
    """Federate ``sites`` (name → prepared site directory) under ``run_config`` (Flower run
    config keys; ``runs-dir`` must outlive this call's reading of the checkpoint) and load
    the latest checkpoint into a fresh model. Raises ``RuntimeError`` naming ``label`` when
    the run did not complete."""
    grid = InProcessGrid(
        {10 + i: InProcessSite(path, name) for i, (name, path) in enumerate(sites.items())}
    )
    cfg = RunConfig.from_run_config(dict(run_config))
    began = time.perf_counter()
    with task_identity():
        run_dir = run_federated(grid, cfg, flwr_run_id=1)
    seconds = time.perf_counter() - began
    final = json.loads((run_dir / "final.json").read_text())
    if final.get("status") != "completed":
        raise RuntimeError(f"{label}: run ended {final.get('status')}")
    path = latest_checkpoint(run_dir)
    if path is None:
        raise RuntimeError(f"{label}: the run completed without a checkpoint")
    checkpoint = load_checkpoint(path)
    model = build_model(cfg.model_config_for(feature_dim))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in checkpoint.arrays.items()})
    return FederatedRun(model, final, seconds, cfg)
