"""Writing a run directory: ``config.json``, ``metrics.jsonl``, ``final.json`` (DESIGN §3).

The round loop calls these; ``fedpath.server.run_files`` reads them back for the report. Every write
is atomic: ``metrics.jsonl`` is rewritten whole each round (it is small), so a coordinator
killed mid-write leaves the previous complete file, never a torn last line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpath.common.atomic import atomic_write_json, atomic_write_text
from fedpath.common.errors import ConfigError

__all__ = ["RUN_DIR_PREFIX", "RunLog", "read_rounds", "strict_json"]

CONFIG_FILE, METRICS_FILE, FINAL_FILE = "config.json", "metrics.jsonl", "final.json"
RUN_DIR_PREFIX = "run directory: "
"""How the ServerApp's log names the run directory (``fedpath run`` looks for it)."""


def strict_json(value: Any) -> Any:
    """Replace non-finite floats (undefined metrics) by None, recursively: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


class RunLog:
    """The run directory of one federated run, as the ServerApp writes it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._rounds: list[dict[str, Any]] = []

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return list(self._rounds)

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_json(self.run_dir / CONFIG_FILE, strict_json(config))

    def read_config(self) -> dict[str, Any]:
        path = self.run_dir / CONFIG_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot be read ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("run_config"), dict):
            raise ConfigError(f"{path}: has no run_config")
        return data

    def load_rounds(self, up_to: int) -> None:
        """Take over the round lines of an earlier attempt, dropping any after ``up_to``.

        A line for a round whose checkpoint was never written (crash between the two writes)
        is dropped, because that round is about to be run again.
        """
        path = self.run_dir / METRICS_FILE
        kept: list[dict[str, Any]] = []
        if path.is_file():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}: line {number} is not JSON ({exc})") from exc
                if isinstance(record, dict) and int(record.get("round", 0)) <= up_to:
                    kept.append(record)
        self._rounds = kept
        self._flush()

    def append_round(self, record: Mapping[str, Any]) -> None:
        self._rounds.append(strict_json(dict(record)))
        self._flush()

    def write_final(self, final: Mapping[str, Any]) -> None:
        atomic_write_json(self.run_dir / FINAL_FILE, strict_json(final))

    def clear_final(self) -> None:
        """A resumed run is not finished: remove the failure record of the previous attempt."""
        (self.run_dir / FINAL_FILE).unlink(missing_ok=True)

    def _flush(self) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self._rounds)
        atomic_write_text(self.run_dir / METRICS_FILE, text)


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The round lines written so far (the file is replaced atomically, never torn)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
