"""Loading configs from TOML files with command-line overrides, with readable errors.

Hospitals edit these files by hand; a pydantic traceback is not a message an IT admin can act
on, so validation errors are flattened into ``section.field: problem`` lines naming the file.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fedpath.common.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge nested dicts; values in ``overrides`` win, ``None`` overrides are ignored."""
    merged: dict[str, Any] = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        elif isinstance(value, Mapping):
            merged[key] = deep_merge({}, value)
        else:
            merged[key] = value
    return {k: v for k, v in merged.items() if not (isinstance(v, dict) and not v)}


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: ``source: section.field: message (got value)``."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling)"
        got = item.get("input")
        suffix = "" if item["type"] in ("missing", "extra_forbidden") else f" (got {got!r})"
        lines.append(f"{source}: {where}: {message}{suffix}")
    return "\n".join(lines)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file into a dict, turning I/O and syntax errors into ``ConfigError``."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from exc


def build_config(
    model: type[ModelT],
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ModelT:
    """Validate file contents merged with overrides into ``model``; raise ``ConfigError``."""
    data = read_toml(path) if path is not None else {}
    merged = deep_merge(data, overrides or {})
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        source = str(path) if path is not None else "command-line options"
        raise ConfigError(format_validation_error(exc, source)) from exc
