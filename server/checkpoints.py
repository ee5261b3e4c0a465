"""Round checkpoints: global weights, round number and strategy state after every round.

Flower has no built-in resume, so a coordinator restart would otherwise lose the whole run.
A checkpoint holds tensors and plain JSON types only and is read with
``torch.load(weights_only=True)``: a file that smuggles pickled objects is refused instead of
executed. Writes are atomic, so a crash mid-write leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpath.common.atomic import atomic_path
from fedpath.common.errors import ConfigError
from fedpath.common.safe_load import pickled_reference

__all__ = [
    "Checkpoint",
    "checkpoint_path",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^round_(\d{4,})\.pt$")


@dataclass(frozen=True)
class Checkpoint:
    """The state of a run after ``server_round`` completed rounds."""

    server_round: int
    arrays: dict[str, np.ndarray]
    strategy: dict[str, Any]
    run_config: dict[str, Any]


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"round_{server_round:04d}.pt"


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoints/round_NNNN.pt`` atomically; returns its path."""
    path = checkpoint_path(run_dir, checkpoint.server_round)
    payload = {
        "format": "fedpath-round-checkpoint-1",
        "server_round": checkpoint.server_round,
        "state_dict": {
            k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in checkpoint.arrays.items()
        },
        "strategy": dict(checkpoint.strategy),
        "run_config": dict(checkpoint.run_config),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of the highest round in ``run_dir``, or None when there is none."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    rounds = [
        (int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) is not None
    ]
    return max(rounds)[1] if rounds else None


_MOVE_ASIDE = "move it out of checkpoints/ to resume from the round before"


def _check_archive(path: Path) -> None:
    """Refuse a file that is not an intact zip archive, before torch reads any of it.

    ``torch.save`` writes a zip whose members carry CRC-32s, but ``torch.load`` never checks
    them: a flipped bit in the tensor data loads silently as a wrong weight (e.g. 1.0 → inf).
    """
    try:
        if path.stat().st_size == 0:
            raise ConfigError(f"{path}: checkpoint is empty (0 bytes); {_MOVE_ASIDE}")
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except FileNotFoundError:
        raise ConfigError(f"{path}: checkpoint not found") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ConfigError(
            f"{path}: not a readable fedpath checkpoint: not an intact archive "
            f"({exc}: truncated or corrupt?); "
            f"{_MOVE_ASIDE}"
        ) from exc
    if bad is not None:
        member = bad.split("/", 1)[-1]  # torch roots the archive at the file's temporary name
        raise ConfigError(
            f"{path}: checkpoint is corrupt: its {member} fails the CRC check; {_MOVE_ASIDE}"
        )


def _refusal(path: Path, exc: pickle.UnpicklingError) -> ConfigError:
    """The weights-only unpickler's refusal, without torch's advice to load it unsafely."""
    what = pickled_reference(exc)
    return ConfigError(
        f"{path}: refused: the checkpoint holds pickled Python objects, not only tensors and "
        f"plain values{what}; fedpath never unpickles code from a file"
    )


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint safely; ``ConfigError`` naming the file when it is not one of ours."""
    _check_archive(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from exc
    except Exception as exc:  # torch raises many unrelated types for bad files
        raise ConfigError(f"{path}: not a readable fedpath checkpoint ({exc})") from exc
    if not isinstance(payload, Mapping) or payload.get("format") != "fedpath-round-checkpoint-1":
        raise ConfigError(f"{path}: not a fedpath round checkpoint")
    state = payload.get("state_dict")
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ConfigError(f"{path}: its state_dict is not a mapping of tensors")
    rnd = payload.get("server_round")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        raise ConfigError(f"{path}: invalid server_round {rnd!r}")
    for key in ("strategy", "run_config"):
        if not isinstance(payload.get(key) or {}, Mapping):
            raise ConfigError(f"{path}: its {key} is not a mapping")
    try:
        arrays = {k: v.numpy() for k, v in state.items()}
    except TypeError as exc:  # e.g. bfloat16, which numpy has no dtype for
        raise ConfigError(f"{path}: a state_dict tensor numpy cannot hold ({exc})") from exc
    return Checkpoint(
        server_round=rnd,
        arrays=arrays,
        strategy=dict(payload.get("strategy") or {}),
        run_config=dict(payload.get("run_config") or {}),
    )
