"""How any fedpath process starts Flower's executables: the venv's binaries, a TOML value for
``--node-config``/``--run-config``, a free loopback port.

Both sides start Flower processes (the hospital its SuperNode, the coordinator the ``flwr``
CLI), so this lives in ``common``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

__all__ = ["flower_bin", "flower_env", "free_port", "port_open", "toml_value"]


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    """Whether something accepts connections on this loopback port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def toml_value(value: Any) -> str:
    """A Python scalar as a TOML value (``flwr run -c`` and ``--node-config`` take TOML).

    Not tomli_w: Flower splits ``key=value key=value`` with its own regex before parsing each
    value as TOML, so this formats one value of that line, not a TOML document.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def flower_env(**extra: str) -> dict[str, str]:
    """Environment for Flower processes: the venv first on PATH, telemetry and update check off.

    The SuperLink and SuperNodes spawn flower-superexec / flwr-serverapp / flwr-clientapp by
    name, so the venv's bin directory must come first on PATH.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", **extra)
    return env


def flower_bin(name: str) -> str:
    """The Flower executable next to this interpreter (the venv's), else from PATH."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name
