"""The message process's side of the resident worker: find it, start it if needed, call it.

A node opts in with ``resident-worker=true`` in its node config (``fedpath node`` sets it
unless ``--no-resident-worker``). The first message of a node starts the worker; later
messages, of this run and the next, reuse it. Two message processes arriving at once start
one worker between them (a lock file), and a worker that died is started again.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from filelock import FileLock
from flwr.app import Context, RecordDict

from fedpath.client.worker_protocol import (
    PROTOCOL_VERSION,
    context_to_wire,
    read_frame,
    records_from_wire,
    records_to_wire,
    write_frame,
)
from fedpath.common.errors import ConfigError, FedpathError
from fedpath.common.locking import kernel_lock

__all__ = ["NODE_CONFIG_KEY", "WorkerError", "call_worker", "socket_path", "worker_enabled"]

NODE_CONFIG_KEY = "resident-worker"
START_TIMEOUT_SECONDS = 300.0
"""Starting a worker imports torch and the trainer: seconds, a minute on a loaded machine."""


class WorkerError(FedpathError):
    """An error the handler raised inside the worker, carried back with its message.

    Reported like the same error raised in this process: a redacted error reply.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def worker_enabled(context: Context) -> bool:
    return context.node_config.get(NODE_CONFIG_KEY) is True


def _code_root() -> Path:
    """The folder the running ``client`` package was imported from (the installed FAB or
    the fedpath installation): the worker must run the same code as this ClientApp."""
    return Path(__file__).resolve().parent.parent


def _runtime_dir() -> Path:
    """A directory only this user can enter: the socket's permission boundary."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    root = Path(base) / "fedpath" if base else Path("/tmp") / f"fedpath-{os.getuid()}"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = root.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(
            f"{root} must be a directory owned by this user with mode 0700 (it holds the "
            "resident worker's socket); remove it or fix its permissions"
        )
    return root


def socket_path(data_dir: Path, runtime_pid: int) -> Path:
    """One worker per SuperNode runtime (its process id), data directory and code copy.

    Keyed by the runtime's pid, so a restarted SuperNode gets a fresh worker; by the code
    root, so a new app version never talks to an old worker. Hashed: Unix socket paths are
    limited to ~100 bytes.
    """
    key = f"{Path(data_dir).resolve()}|{runtime_pid}|{_code_root()}"
    name = hashlib.sha256(key.encode()).hexdigest()[:20]
    return _runtime_dir() / f"worker-{name}.sock"


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    return sock


def _spawn_lock(path: Path) -> FileLock:
    """Held by the message process that starts the worker; the others wait for it without a
    time limit (the start itself is bounded), then find the worker it started."""
    return kernel_lock(path.with_suffix(".lock"), timeout=-1, mode=0o600)


def _start(path: Path, runtime_pid: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    root = str(_code_root())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # Its own session: the worker outlives this message process (that is its point) and
    # watches the SuperNode runtime instead; its output goes where this process's goes.
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedpath.client.worker",
            "--socket",
            str(path),
            "--parent-pid",
            str(runtime_pid),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def _connect_or_start(path: Path, runtime_pid: int, timeout: float) -> socket.socket:
    sock = _connect(path)
    if sock is not None:
        return sock
    with _spawn_lock(path):
        sock = _connect(path)
        if sock is not None:
            return sock
        proc = _start(path, runtime_pid)
        deadline = time.monotonic() + timeout
        while True:
            sock = _connect(path)
            if sock is not None:
                return sock
            code = proc.poll()
            if code is not None:
                raise OSError(
                    f"the resident worker exited with code {code} at start (see the "
                    "SuperNode's log); set resident-worker=false to run in the message process"
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise OSError(f"the resident worker did not start within {timeout:.0f} s")
            time.sleep(0.05)


def call_worker(
    op: str,
    content: RecordDict,
    context: Context,
    data_dir: Path,
    *,
    runtime_pid: int | None = None,
    start_timeout: float = START_TIMEOUT_SECONDS,
) -> RecordDict:
    """Run handler ``op`` in the node's worker; return its reply content.

    ``context.state`` is replaced by the state the handler left (the privacy entries), so
    Flower stores it exactly as if the handler had run here.
    """
    pid = os.getppid() if runtime_pid is None else runtime_pid
    path = socket_path(data_dir, pid)
    blobs: list[bytes] = []
    header = {
        "version": PROTOCOL_VERSION,
        "op": op,
        "content": records_to_wire(content, blobs),
        "context": context_to_wire(context, blobs),
    }
    with _connect_or_start(path, pid, start_timeout) as sock:
        write_frame(sock, header, blobs)
        try:
            reply, reply_blobs = read_frame(sock)
        except OSError as exc:
            raise OSError(
                f"the resident worker stopped during the {op} message ({exc}); see the "
                "SuperNode's log, the next message starts a new worker"
            ) from exc
    if reply.get("ok") is True:
        context.state = records_from_wire(reply.get("state"), reply_blobs)
        return records_from_wire(reply.get("content"), reply_blobs)
    message = str(reply.get("message", "unknown error"))
    if reply.get("kind") == "expected":
        raise WorkerError(str(reply.get("type", "")), message)
    raise RuntimeError(
        f"the resident worker's {op} handler failed: {reply.get('type')}: {message}\n"
        f"{reply.get('traceback', '')}"
    )
