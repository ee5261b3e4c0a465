"""The resident worker: its wire format, its error mapping, and real worker processes.

The integration tests start real workers (``python -m fedpath.client.worker``) the way a message
process does and compare their replies with the same handler run in the test process.
"""

from __future__ import annotations

import gc
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from numpy.lib import format as npy_format

from fedpath.client.app import CONTENT_HANDLERS, app
from fedpath.client.worker import _release_memory, handle_request
from fedpath.client.worker_client import WorkerError, call_worker, socket_path
from fedpath.client.worker_protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    context_from_wire,
    context_to_wire,
    read_frame,
    records_from_wire,
    records_to_wire,
    write_frame,
)
from fedpath.common.errors import ConfigError
from fedpath.common.federation import TRAIN_METRICS
from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site
from tests.round_messages import round_message

TIMING = tuple(k for k in TRAIN_METRICS if k.endswith("seconds"))
"""Wall-clock metrics: the only values allowed to differ between two runs of a handler."""
SPEC = SyntheticSiteSpec(n_slides=8, feature_dim=16, patches=(10, 30))


def _records() -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord(
                {
                    "w": Array(np.arange(12, dtype=np.float32).reshape(3, 4) / 7),
                    "scalar": Array(np.array(2.5, dtype=np.float64)),
                    "empty": Array(np.zeros((0, 5), dtype=np.float32)),
                    "ids": Array(np.array([1, -2, 3], dtype=np.int64)),
                    "mask": Array(np.array([True, False])),
                }
            ),
            "config": ConfigRecord(
                {
                    "text": "é ok",
                    "n": 3,
                    "x": 0.25,
                    "flag": False,
                    "raw": b"\x00\xff",
                    "many": [1, 2],
                    "words": ["a", "b"],
                }
            ),
            "metrics": MetricRecord({"loss": 0.5, "n": 4, "curve": [0.1, 0.2]}),
        }
    )


def _comparable(value: object, rtol: float) -> object:
    """NaN as a marker (NaN != NaN); floats to the digits ``rtol`` leaves."""
    if isinstance(value, float):
        if value != value:
            return "NaN"
        return float(f"{value:.5g}") if rtol else value
    return value


def _same_records(
    a: RecordDict, b: RecordDict, timing: tuple[str, ...] = (), rtol: float = 0.0
) -> None:
    """Equal records, value types included; ``timing`` metrics (wall seconds) may differ, and
    arrays by ``rtol`` (two processes may sum in another order if torch's threads differ)."""
    assert a.array_records.keys() == b.array_records.keys()
    for name, rec in a.array_records.items():
        assert list(rec) == list(b.array_records[name])
        for key, arr in rec.items():
            got = b.array_records[name][key].numpy()
            assert got.dtype == arr.numpy().dtype and got.shape == arr.numpy().shape
            np.testing.assert_allclose(got, arr.numpy(), rtol=rtol, atol=rtol * 1e-3)
    for kind in ("config_records", "metric_records"):
        left, right = getattr(a, kind), getattr(b, kind)

        def timeless(records: dict) -> dict:
            return {
                n: {k: _comparable(v, rtol) for k, v in r.items() if k not in timing}
                for n, r in records.items()
            }

        assert timeless(left) == timeless(right)
        for name, rec in left.items():
            for key, value in rec.items():
                assert type(right[name][key]) is type(value)


def test_records_round_trip_keeps_values_dtypes_and_types() -> None:
    blobs: list[bytes] = []
    wire = records_to_wire(_records(), blobs)
    _same_records(_records(), records_from_wire(wire, blobs))


def test_context_round_trip() -> None:
    state = RecordDict({"fedpath-privacy": ConfigRecord({"ds": "[1, 2]"})})
    ctx = Context(
        run_id=5,
        node_id=9,
        node_config={"data-path": "/d", "resident-worker": True},
        state=state,
        run_config={"num-server-rounds": 3, "lr": 1e-3},
    )
    blobs: list[bytes] = []
    back = context_from_wire(context_to_wire(ctx, blobs), blobs)
    assert (back.run_id, back.node_id) == (5, 9)
    assert back.node_config == ctx.node_config and back.run_config == ctx.run_config
    assert dict(back.state.config_records["fedpath-privacy"]) == {"ds": "[1, 2]"}


def test_frames_cross_a_socket_and_bad_frames_are_refused() -> None:
    left, right = socket.socketpair()
    with left, right:
        blobs: list[bytes] = []
        header = {"content": records_to_wire(_records(), blobs), "nan": float("nan")}
        write_frame(left, header, blobs)
        got, got_blobs = read_frame(right)
        _same_records(_records(), records_from_wire(got["content"], got_blobs))
        assert np.isnan(got["nan"])

        left.sendall(struct.pack(">Q", 1 << 40))
        with pytest.raises(ProtocolError, match="exceeds"):
            read_frame(right)
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack(">Q", 5) + b"nope!")
        with pytest.raises(ProtocolError, match="not JSON"):
            read_frame(right)
    left, right = socket.socketpair()
    with right:
        left.sendall(struct.pack(">Q", 100) + b"{")
        left.close()
        with pytest.raises(ProtocolError, match="closed after 1 of 100"):
            read_frame(right)


def _npy(header: dict, payload: bytes) -> bytes:
    """An ``.npy`` buffer with this header dict, whatever the payload (to forge bad ones)."""
    out = io.BytesIO()
    npy_format.write_array_header_1_0(out, header)
    return out.getvalue() + payload


def test_arrays_that_are_not_plain_numbers_or_do_not_fit_are_refused() -> None:
    with pytest.raises(ProtocolError, match="dtype <U1"):
        records_to_wire(RecordDict({"a": ArrayRecord({"x": Array(np.array(["a"]))})}), [])
    foreign = Array(dtype="float32", shape=(1,), stype="torch.Tensor", data=b"\x00" * 4)
    with pytest.raises(ProtocolError, match=r"serialised as 'torch\.Tensor'"):
        records_to_wire(RecordDict({"a": ArrayRecord({"x": foreign})}), [])
    wire = {"arrays": {"a": {"x": {"npy": 0}}}, "configs": {}, "metrics": {}}
    short = _npy({"descr": "<f4", "fortran_order": False, "shape": (3,)}, b"\x00" * 8)
    with pytest.raises(ProtocolError, match="does not fit"):
        records_from_wire(wire, [short])
    pickled = _npy({"descr": "|O", "fortran_order": False, "shape": (1,)}, b"\x00" * 8)
    with pytest.raises(ProtocolError, match="dtype object cannot be received"):
        records_from_wire(wire, [pickled])
    with pytest.raises(ProtocolError, match="malformed array buffer"):
        records_from_wire(wire, [b"not an npy buffer"])
    with pytest.raises(ProtocolError, match="malformed array entry"):
        records_from_wire(wire, [])
    with pytest.raises(ProtocolError, match="malformed record value"):
        records_from_wire({"arrays": {}, "configs": {"c": {"k": {"pickle": 1}}}, "metrics": {}}, [])


def test_arrays_cross_as_flowers_own_bytes() -> None:
    """No decode and re-encode on the hop: the receiver holds the sender's very buffer."""
    array = Array(np.arange(6, dtype=np.float32).reshape(2, 3))
    blobs: list[bytes] = []
    wire = records_to_wire(RecordDict({"a": ArrayRecord({"x": array})}), blobs)
    assert blobs == [array.data] and blobs[0] is array.data
    back = records_from_wire(wire, blobs).array_records["a"]["x"]
    assert back.data is array.data and (back.dtype, back.shape) == ("float32", (2, 3))


def _request(op: str, content: RecordDict | None = None) -> tuple[dict, list[bytes]]:
    blobs: list[bytes] = []
    ctx = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    header = {
        "version": PROTOCOL_VERSION,
        "op": op,
        "content": records_to_wire(content or RecordDict(), blobs),
        "context": context_to_wire(ctx, blobs),
    }
    return header, blobs


def test_handle_request_maps_errors_like_the_message_process() -> None:
    def ok(content: RecordDict, context: Context) -> RecordDict:
        context.state["s"] = ConfigRecord({"seen": len(content.array_records["arrays"])})
        return RecordDict({"m": MetricRecord({"v": 1.0})})

    def refuses(content: RecordDict, context: Context) -> RecordDict:
        raise ConfigError("site_a: feature file /data/x.h5 is broken")

    def crashes(content: RecordDict, context: Context) -> RecordDict:
        raise KeyError("boom")

    handlers = {"ok": ok, "refuses": refuses, "crashes": crashes}
    reply, blobs = handle_request(*_request("ok", _records()), handlers)
    assert reply["ok"] is True
    assert dict(records_from_wire(reply["content"], blobs).metric_records["m"]) == {"v": 1.0}
    assert dict(records_from_wire(reply["state"], blobs).config_records["s"]) == {"seen": 5}

    reply, _ = handle_request(*_request("refuses"), handlers)
    assert reply == {
        "ok": False,
        "kind": "expected",
        "type": "ConfigError",
        "message": "site_a: feature file /data/x.h5 is broken",
    }
    reply, _ = handle_request(*_request("crashes"), handlers)
    assert reply["kind"] == "bug" and "KeyError" in reply["traceback"]
    reply, _ = handle_request(*_request("nope"), handlers)
    assert reply["kind"] == "expected" and "unknown operation" in reply["message"]
    header, blobs = _request("ok")
    header["version"] = PROTOCOL_VERSION + 1
    assert "protocol" in handle_request(header, blobs, handlers)[0]["message"]


@pytest.mark.slow
def test_after_a_message_the_collector_walks_only_what_the_next_one_creates() -> None:
    """A full collection walked torch's ~380,000 import-time objects after every message
    (~220 ms of CPU per message); they are frozen now, and a message's cycles still go."""

    class Node:
        pass

    try:
        _release_memory()
        frozen = gc.get_freeze_count()
        assert frozen > 0
        node = Node()
        node.self = node  # a reference cycle, as a message's garbage may hold
        alive = weakref.ref(node)
        del node
        assert alive() is not None
        _release_memory()
        assert alive() is None, "a message's cyclic garbage outlived the collection"
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()


def test_content_handlers_are_the_clientapps_message_types() -> None:
    assert set(CONTENT_HANDLERS) == {MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY}


# --------------------------------------------------------------------------------------------
# Real worker processes
# --------------------------------------------------------------------------------------------


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short private XDG_RUNTIME_DIR (Unix socket paths are limited to ~100 bytes); every
    worker started under it is killed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="fw"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(root))
    yield root
    for sock in (root / "fedpath").glob("*.sock"):
        pid = _worker_pid(sock)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


def _worker_pid(path: Path) -> int | None:
    """The pid of the process listening on ``path`` (the kernel's peer credentials)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        return None
    with sock:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # The worker is not our child, but reap it if it is (zombies answer kill(pid, 0)).
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_site(tmp_path_factory.mktemp("wsite") / "a", SPEC, seed=0)


def _context(data: Path, worker: bool) -> Context:
    node_config = {"data-path": str(data), "site": "site_a", "resident-worker": worker}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _train_message() -> Message:
    return round_message(MessageType.TRAIN, SPEC.feature_dim)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("flower_task")
def test_worker_reply_equals_the_in_process_reply_and_the_worker_is_reused(
    site: Path, runtime_dir: Path
) -> None:
    here = app(_train_message(), _context(site, worker=False))
    there = app(_train_message(), _context(site, worker=True))
    assert not here.has_error() and not there.has_error(), (here.error, there.error)
    _same_records(here.content, there.content, TIMING, rtol=1e-5)

    path = socket_path(site, os.getppid())
    first = _worker_pid(path)
    assert first is not None and first != os.getpid()
    again = app(_train_message(), _context(site, worker=True))
    _same_records(here.content, again.content, TIMING, rtol=1e-5)
    assert _worker_pid(path) == first, "the second message started another worker"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("flower_task")
def test_worker_errors_become_redacted_error_replies(tmp_path: Path, runtime_dir: Path) -> None:
    unprepared = tmp_path / "site_b"
    unprepared.mkdir()
    reply = app(_train_message(), _context(unprepared, worker=True))
    assert reply.has_error()
    assert reply.error.reason.startswith("site_a: ")
    assert str(tmp_path) not in reply.error.reason and "[ref " in reply.error.reason


@pytest.mark.slow
@pytest.mark.integration
def test_worker_exits_with_its_runtime_and_a_dead_worker_is_replaced(
    site: Path, runtime_dir: Path
) -> None:
    runtime = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        ctx = _context(site, worker=True)
        call_worker("query", RecordDict(), ctx, site, runtime_pid=runtime.pid)
        path = socket_path(site, runtime.pid)
        first = _worker_pid(path)
        assert first is not None

        os.kill(first, signal.SIGKILL)  # a crash: the next message starts a new worker
        assert _gone(first, 10)
        facts = call_worker("query", RecordDict(), ctx, site, runtime_pid=runtime.pid)
        assert "facts" in facts.config_records["config"]
        second = _worker_pid(path)
        assert second is not None and second != first

        runtime.kill()  # the SuperNode's runtime went away: the worker follows
        runtime.wait()
        assert _gone(second, 10), "the worker outlived its SuperNode runtime"
        assert not path.exists() and not path.with_suffix(".lock").exists()
    finally:
        runtime.kill()


def test_a_worker_error_is_a_fedpath_error_with_the_original_message() -> None:
    exc = WorkerError("ConfigError", "site_a: no slides")
    assert str(exc) == "site_a: no slides" and exc.kind == "ConfigError"


def test_socket_directory_must_be_private(monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(tempfile.mkdtemp(prefix="fw"))
    try:
        (root / "fedpath").mkdir(mode=0o755)
        os.chmod(root / "fedpath", 0o755)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(root))
        with pytest.raises(ConfigError, match="mode 0700"):
            socket_path(root, 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
