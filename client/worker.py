"""The hospital's resident worker: runs the ClientApp's handlers in a process that stays up.

Flower starts a fresh ClientApp process for every message. Importing torch, h5py,
scikit-learn's metrics and the optimiser machinery costs seconds per message, several times a
round, on machines where a round's training takes seconds too. The worker imports them once
and serves every message of every run on this node: the message process only forwards the
content and the run context over a private local socket (:mod:`fedpath.client.worker_client`) and
hands the reply back to Flower. The handlers are the very functions the ClientApp would run
itself (:data:`client.app.CONTENT_HANDLERS`), so results are the same either way. Between the
messages of a run the worker also keeps the validated feature bags it read, up to a byte cap
(:mod:`fedpath.client.training.bag_cache`): a round's evaluate message reads what its train message
just read.

Isolation that matters is kept: one worker per SuperNode (its socket is keyed by the
SuperNode's process and the data directory), a socket in a 0700 directory that also checks
the peer's uid, no pickle on the wire, one message at a time, and the worker exits when the
SuperNode's runtime goes away (checked every second, also mid-message) or after a long idle
time. A worker that dies is simply started again by the next message.

On a node whose ``device`` is a GPU (:mod:`fedpath.client.node_device`) the worker is where CUDA is
initialised, once: its context outlives the messages, the cached GPU memory does not.

What it does is logged on its module logger; ``main`` sends that to its stderr, which is the
SuperNode's log (:mod:`fedpath.client.node_log`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import logging
import os
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpath.client.worker_protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    context_from_wire,
    read_frame,
    records_from_wire,
    records_to_wire,
    write_frame,
)
from fedpath.common.errors import SITE_REPLY_ERRORS

if TYPE_CHECKING:
    from fedpath.client.training.bag_cache import BagCache

__all__ = ["handle_request", "main", "serve"]

logger = logging.getLogger(__name__)

IDLE_EXIT_SECONDS = 6 * 3600.0
"""An idle worker gives its memory back after this long; the next message starts a new one."""
PARENT_POLL_SECONDS = 1.0


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _release_memory() -> None:
    """Hand freed heap back to the OS after a message: a big site's bags beyond the bag
    cache's cap should not stay resident between rounds (glibc keeps freed arenas otherwise).

    The collection walks only what the message created: whatever survives it is frozen
    (:func:`_freeze_survivors`), as the imports were after the warm-up.
    """
    gc.collect()
    _freeze_survivors()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    _release_gpu_memory()


def _release_gpu_memory() -> None:
    """Give the GPU memory torch's caching allocator holds back between messages: a node
    that trained on the hospital's GPU should not keep it occupied for the hours until the
    next round (other jobs, or the other nodes of the machine, need it). The CUDA context
    itself stays, so the next message does not pay for its start-up again."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _freeze_survivors() -> None:
    """Move every object alive now out of the cyclic collector's reach (``gc.freeze``).

    torch, scikit-learn and torch._dynamo leave ~380,000 tracked objects behind at import,
    none of them ever garbage; a full collection walked all of them after every message
    (~220 ms of CPU, while the other sites of the round still train on the same cores).
    Frozen objects are still freed by reference counting (an evicted cached bag goes at
    once); only a reference cycle formed among them later would never be collected.
    """
    gc.freeze()


def handle_request(
    header: dict[str, Any],
    blobs: list[bytes],
    handlers: dict[str, Callable[..., Any]],
    *,
    bag_cache: BagCache | None = None,
) -> tuple[dict[str, Any], list[bytes]]:
    """One message: decode, run the named handler, encode the reply content and the state.

    Errors the ClientApp reports to the server come back as ``expected`` with their message
    (it redacts them, as for an in-process failure); anything else as ``bug`` with a
    traceback, which the ClientApp raises so Flower records a ClientApp exception.

    With ``bag_cache`` the handler's bag reads go through it: scoped to the message's run,
    capped by the node config's ``bag-cache-mib`` (:mod:`fedpath.client.training.bag_cache`).
    """
    if header.get("version") != PROTOCOL_VERSION:
        return {
            "ok": False,
            "kind": "expected",
            "type": "ProtocolError",
            "message": f"worker speaks protocol {PROTOCOL_VERSION}, "
            f"the message process {header.get('version')!r}",
        }, []
    op = header.get("op")
    handler = handlers.get(op) if isinstance(op, str) else None
    if handler is None:
        return {
            "ok": False,
            "kind": "expected",
            "type": "ProtocolError",
            "message": f"unknown operation {op!r}",
        }, []
    content = records_from_wire(header.get("content"), blobs)
    context = context_from_wire(header.get("context"), blobs)
    try:
        reply = _run_handler(handler, content, context, bag_cache)
    except SITE_REPLY_ERRORS as exc:
        return {
            "ok": False,
            "kind": "expected",
            "type": type(exc).__name__,
            "message": str(exc),
        }, []
    except Exception as exc:  # reported to the message process, which raises it
        return {
            "ok": False,
            "kind": "bug",
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": traceback.format_exc(),
        }, []
    out_blobs: list[bytes] = []
    reply_wire = records_to_wire(reply, out_blobs)
    state_wire = records_to_wire(context.state, out_blobs)
    return {"ok": True, "content": reply_wire, "state": state_wire}, out_blobs


def _run_handler(
    handler: Callable[..., Any], content: Any, context: Any, bag_cache: BagCache | None
) -> Any:
    if bag_cache is None:
        return handler(content, context)
    from fedpath.client.training.bag_cache import cap_from_node_config, use_bag_cache

    bag_cache.begin(int(context.run_id), cap_from_node_config(context.node_config))
    with use_bag_cache(bag_cache):
        return handler(content, context)


def _warm_up() -> None:
    """Import what every message needs, so the first message does not pay for it either."""
    import torch

    import fedpath.client.federated  # noqa: F401 - torch, h5py, the trainer, sklearn metrics

    # The first optimiser construction imports torch._dynamo (seconds); do it now.
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])


def _watch_parent(parent_pid: int, sock_path: Path) -> None:
    """Exit as soon as the SuperNode's runtime is gone, even in the middle of a message:
    a stopped hospital node must not keep training (writes are atomic, nothing is left
    half-written). The socket and its lock file go too: no runtime will use them again."""
    while True:
        time.sleep(PARENT_POLL_SECONDS)
        if not _alive(parent_pid):
            for path in (sock_path, sock_path.with_suffix(".lock")):
                with contextlib.suppress(OSError):
                    path.unlink()
            os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(
    sock_path: Path,
    handlers: dict[str, Callable[..., Any]],
    *,
    parent_pid: int | None,
    idle_seconds: float = IDLE_EXIT_SECONDS,
    warm_up: bool = True,
    bag_cache: BagCache | None = None,
) -> None:
    """Bind ``sock_path`` and serve messages one at a time until idle or orphaned.

    The socket is bound before the warm-up, so a second message process that arrives while
    the first one started the worker finds it and waits in the listen backlog instead of
    starting another worker. ``bag_cache`` keeps a run's feature bags between its messages.
    """
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    old_umask = os.umask(0o177)
    try:
        server.bind(str(sock_path))
    finally:
        os.umask(old_umask)
    server.listen(16)
    if parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(parent_pid, sock_path), daemon=True).start()
    logger.info(f"worker {os.getpid()}: listening on {sock_path}")
    if warm_up:
        began = time.perf_counter()
        _warm_up()
        gc.collect()
        _freeze_survivors()
        logger.info(f"worker: ready in {time.perf_counter() - began:.1f} s")
    server.settimeout(min(idle_seconds, 60.0))
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_seconds:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                _serve_one(conn, handlers, bag_cache)
            last = time.monotonic()
            _release_memory()
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            if sock_path.exists() and sock_path.is_socket():
                sock_path.unlink()
    logger.info(f"worker {os.getpid()}: idle for {idle_seconds:.0f} s, exiting")


def _serve_one(
    conn: socket.socket,
    handlers: dict[str, Callable[..., Any]],
    bag_cache: BagCache | None,
) -> None:
    conn.settimeout(None)
    if _peer_uid(conn) != os.getuid():
        logger.warning("worker: refused a connection from another user")
        return
    try:
        header, blobs = read_frame(conn)
        began = time.perf_counter()
        reply, out_blobs = handle_request(header, blobs, handlers, bag_cache=bag_cache)
        write_frame(conn, reply, out_blobs)
    except (ProtocolError, OSError) as exc:
        logger.warning(f"worker: dropped a message ({exc})")
        return
    status = "ok" if reply.get("ok") else f"{reply.get('kind')} error"
    cached = ""
    if bag_cache is not None:
        cached = (
            f" (bag cache: {len(bag_cache)} bags, {bag_cache.nbytes / 2**20:.0f} MiB, "
            f"{bag_cache.hits} hits, {bag_cache.misses} misses)"
        )
    logger.info(
        f"worker: {header.get('op')} {status} in {time.perf_counter() - began:.2f} s" + cached
    )
    if reply.get("kind") == "bug":
        logger.error(reply.get("traceback", ""))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fedpath.client.worker", description=__doc__)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--idle-seconds", type=float, default=IDLE_EXIT_SECONDS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    from fedpath.client.app import CONTENT_HANDLERS
    from fedpath.client.node_log import node_log
    from fedpath.client.training.bag_cache import BagCache

    with node_log():  # the worker's stderr is the SuperNode's log
        serve(
            args.socket,
            dict(CONTENT_HANDLERS),
            parent_pid=args.parent_pid,
            idle_seconds=args.idle_seconds,
            bag_cache=BagCache(),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
