"""Wire format between a ClientApp message process and the hospital's resident worker.

Flower starts a fresh ClientApp process for every message; the work itself runs in a worker
process that stays alive between messages (:mod:`fedpath.client.worker`). What crosses the local
socket is a message's content and the run context, never code: a JSON header plus raw array
buffers, decoded without pickle (the safe-loading rule holds on this hop too).

A frame is ``u64 header length · header JSON · u32 blob count · (u64 length · bytes)*``. An
array's blob is the ``.npy`` buffer Flower's ``Array`` already holds (``np.save`` without
pickle), sent and received as it is: only its header is read, to refuse object or structured
dtypes and buffers that do not fit it. Config values that are bytes travel as blobs too, so
JSON carries only numbers, strings, booleans and lists of them.

Not ``multiprocessing.connection``: its ``send_bytes``/``recv_bytes`` would replace only the
length prefixes and :func:`_recv_exactly` (~15 lines), and cost more than that back. A dead
peer is an ``EOFError`` there (not an ``OSError``: both ends would need another except), an
oversized one "bad message length" without the sizes, a socket with a timeout cannot be
wrapped (its descriptor is non-blocking: ``BlockingIOError``), and its ``Listener`` has no
accept timeout (the idle exit), no peer-uid check and no umask for the socket file, so the
socket code around it stays anyway.
"""

from __future__ import annotations

import io
import json
import socket
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from numpy.lib import format as npy_format

__all__ = [
    "PROTOCOL_VERSION",
    "ProtocolError",
    "context_from_wire",
    "context_to_wire",
    "read_frame",
    "records_from_wire",
    "records_to_wire",
    "write_frame",
]

PROTOCOL_VERSION = 2
"""Bumped when the frame layout or the header's fields change (2: arrays as ``.npy`` bytes)."""
MAX_HEADER_BYTES = 64 * 1024 * 1024
"""A header is metadata; anything this large is not one of ours."""
MAX_BLOB_BYTES = 16 * 1024**3
MAX_BLOBS = 1_000_000
_ALLOWED_KINDS = frozenset("biuf")
"""Array dtypes that may cross: bool, signed/unsigned integers, floats (never object)."""
_NPY_STYPE = "numpy.ndarray"
"""Flower's serialisation type of an ``Array`` holding ``np.save`` bytes (no pickle)."""


class ProtocolError(OSError):
    """A frame that is truncated, oversized or not in this format.

    An ``OSError``, so the ClientApp's error path treats it like any broken local connection.
    """


def _value_to_wire(value: Any, blobs: list[bytes]) -> Any:
    if isinstance(value, bytes):
        blobs.append(value)
        return {"bytes": len(blobs) - 1}
    if isinstance(value, list):
        return {"list": [_value_to_wire(v, blobs) for v in value]}
    if isinstance(value, bool | int | float | str):
        return {"scalar": value}
    raise ProtocolError(f"a record value of type {type(value).__name__} cannot be sent")


def _value_from_wire(item: Any, blobs: list[bytes]) -> Any:
    if not isinstance(item, dict) or len(item) != 1:
        raise ProtocolError(f"malformed record value {item!r:.80}")
    ((kind, body),) = item.items()
    if kind == "scalar" and isinstance(body, bool | int | float | str):
        return body
    if kind == "bytes" and isinstance(body, int) and 0 <= body < len(blobs):
        return blobs[body]
    if kind == "list" and isinstance(body, list):
        return [_value_from_wire(v, blobs) for v in body]
    raise ProtocolError(f"malformed record value {item!r:.80}")


def _npy_layout(data: bytes, direction: str) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape of an ``.npy`` buffer (what Flower's ``Array`` holds), from its header
    alone: the payload is neither parsed nor copied, only checked to fit the header."""
    stream = io.BytesIO(data)  # shares ``data`` (no copy while it is only read)
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise ProtocolError(f"array buffer of .npy version {version} cannot be {direction}")
    except ValueError as exc:
        raise ProtocolError(f"malformed array buffer ({exc})") from exc
    if dtype.kind not in _ALLOWED_KINDS:
        raise ProtocolError(f"arrays of dtype {dtype} cannot be {direction}")
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(data) - stream.tell():
        raise ProtocolError(f"array of shape {shape} and dtype {dtype} does not fit its buffer")
    return dtype, tuple(int(n) for n in shape)


def _array_to_wire(array: Array, blobs: list[bytes]) -> dict[str, Any]:
    """Flower's own ``.npy`` bytes cross as they are: no decode, copy and re-encode."""
    if array.stype != _NPY_STYPE:
        raise ProtocolError(f"arrays serialised as {array.stype!r} cannot be sent")
    _npy_layout(array.data, "sent")
    blobs.append(array.data)
    return {"npy": len(blobs) - 1}


def _array_from_wire(item: Any, blobs: list[bytes]) -> Array:
    try:
        blob = blobs[int(item["npy"])]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ProtocolError(f"malformed array entry {item!r:.80}") from exc
    dtype, shape = _npy_layout(blob, "received")
    return Array(dtype=str(dtype), shape=shape, stype=_NPY_STYPE, data=blob)


def records_to_wire(records: RecordDict, blobs: list[bytes]) -> dict[str, Any]:
    """A RecordDict as JSON-able dict; array and byte payloads appended to ``blobs``."""
    return {
        "arrays": {
            name: {key: _array_to_wire(arr, blobs) for key, arr in rec.items()}
            for name, rec in records.array_records.items()
        },
        "configs": {
            name: {key: _value_to_wire(v, blobs) for key, v in rec.items()}
            for name, rec in records.config_records.items()
        },
        "metrics": {
            name: {key: _value_to_wire(v, blobs) for key, v in rec.items()}
            for name, rec in records.metric_records.items()
        },
    }


def records_from_wire(data: Any, blobs: list[bytes]) -> RecordDict:
    """Inverse of :func:`records_to_wire`."""
    if not isinstance(data, dict) or set(data) != {"arrays", "configs", "metrics"}:
        raise ProtocolError("malformed record dict")
    out: dict[str, ArrayRecord | ConfigRecord | MetricRecord] = {}
    for name, entries in data["arrays"].items():
        out[name] = ArrayRecord({k: _array_from_wire(v, blobs) for k, v in entries.items()})
    for name, entries in data["configs"].items():
        out[name] = ConfigRecord({k: _value_from_wire(v, blobs) for k, v in entries.items()})
    for name, entries in data["metrics"].items():
        out[name] = MetricRecord({k: _value_from_wire(v, blobs) for k, v in entries.items()})
    return RecordDict(out)


def _plain_config(values: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in values.items():
        if not isinstance(value, bool | int | float | str):
            raise ProtocolError(f"config key {key!r} has a value of type {type(value).__name__}")
    return dict(values)


def context_to_wire(context: Context, blobs: list[bytes]) -> dict[str, Any]:
    """The parts of Flower's run context a handler reads, and the state it may change."""
    return {
        "run_id": int(context.run_id),
        "node_id": int(context.node_id),
        "node_config": _plain_config(context.node_config),
        "run_config": _plain_config(context.run_config),
        "state": records_to_wire(context.state, blobs),
    }


def context_from_wire(data: Any, blobs: list[bytes]) -> Context:
    """Inverse of :func:`context_to_wire`."""
    try:
        return Context(
            run_id=int(data["run_id"]),
            node_id=int(data["node_id"]),
            node_config=_plain_config(data["node_config"]),
            state=records_from_wire(data["state"], blobs),
            run_config=_plain_config(data["run_config"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed context ({exc})") from exc


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 24))
        if k == 0:
            raise ProtocolError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def write_frame(sock: socket.socket, header: Mapping[str, Any], blobs: list[bytes]) -> None:
    """Send one frame; ``header`` must be JSON-able (NaN allowed: metrics may hold it)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    parts = [struct.pack(">Q", len(text)), text, struct.pack(">I", len(blobs))]
    sock.sendall(b"".join(parts))
    for blob in blobs:
        sock.sendall(struct.pack(">Q", len(blob)))
        sock.sendall(blob)


def read_frame(sock: socket.socket) -> tuple[dict[str, Any], list[bytes]]:
    """Receive one frame; sizes are checked before anything is allocated."""
    (size,) = struct.unpack(">Q", _recv_exactly(sock, 8))
    if size > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {size} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(_recv_exactly(sock, size))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"frame header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not a JSON object")
    (count,) = struct.unpack(">I", _recv_exactly(sock, 4))
    if count > MAX_BLOBS:
        raise ProtocolError(f"frame announces {count} buffers (at most {MAX_BLOBS})")
    blobs = []
    for _ in range(count):
        (length,) = struct.unpack(">Q", _recv_exactly(sock, 8))
        if length > MAX_BLOB_BYTES:
            raise ProtocolError(f"buffer of {length} bytes exceeds {MAX_BLOB_BYTES}")
        blobs.append(_recv_exactly(sock, length))
    return header, blobs
