"""Safe loading (issue 7.5): nothing fedpath reads from disk or receives is ever unpickled.

Every file loader is fed a file whose payload is a pickled object with a side effect (its
``__reduce__`` writes a marker file, or ``exec``s code that does): a round checkpoint, a local
model checkpoint, an encoder weights file for each registered architecture that takes one, a
file dressed up as a TorchScript encoder, and model arrays received in a Flower message. Each is
refused with an error naming the file (or the site) and the marker never appears. A control
test shows the payloads are real: plain unpickling does write the marker. A source audit keeps
it that way: every ``torch.load`` passes ``weights_only=True``, every ``np.load``
``allow_pickle=False``, and nothing calls pickle, joblib, dill, marshal or shelve loaders.

(Corrupt and truncated checkpoints are tests/test_bad_inputs.py's; this file is about payloads
that would run code.)
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedpath.common.errors import ConfigError, EncoderError

ROOT = Path(__file__).resolve().parents[1]


class WritesMarker:
    """Unpickling this calls ``Path.write_text(marker, ...)``: code run by a data file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (Path.write_text, (self.marker, "unpickled"))


class ExecsCode:
    """Unpickling this ``exec``s a statement that writes the marker (the classic exploit)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",))


GADGETS = {"write_text": WritesMarker, "exec": ExecsCode}


def _state() -> dict[str, torch.Tensor]:
    return {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}


def _write_payload(path: Path, fmt: str, gadget: Any) -> Path:
    """A file in one of the shapes a malicious checkpoint or weights file takes."""
    if fmt == "torch-zip":  # torch.save's default format, the evil object beside real tensors
        torch.save({"state_dict": _state(), "extra": gadget}, path)
    elif fmt == "torch-legacy":  # torch's pre-1.6 pickle format
        torch.save(
            {"state_dict": _state(), "extra": gadget}, path, _use_new_zipfile_serialization=False
        )
    elif fmt == "fedpath-shaped":  # every key of a fedpath round checkpoint, one value hostile
        payload = {
            "format": "fedpath-round-checkpoint-1",
            "server_round": 1,
            "state_dict": _state(),
            "strategy": gadget,
            "run_config": {},
        }
        torch.save(payload, path)
    elif fmt == "raw-pickle":
        path.write_bytes(pickle.dumps(gadget, protocol=pickle.HIGHEST_PROTOCOL))
    else:
        raise AssertionError(fmt)
    return path


FORMATS = ("torch-zip", "torch-legacy", "fedpath-shaped", "raw-pickle")


def _round_checkpoint(path: Path) -> None:
    from fedpath.server.checkpoints import load_checkpoint

    load_checkpoint(path)


def _model_checkpoint(path: Path) -> None:
    from fedpath.client.training.evaluate import load_checkpoint

    load_checkpoint(path)


def _encoder_weights(name: str) -> Callable[[Path], None]:
    def load(path: Path) -> None:
        from fedpath.client.embed.registry import load_encoder

        load_encoder(name, weights_path=path)

    return load


LOADERS: dict[str, tuple[Callable[[Path], None], type[Exception]]] = {
    "round checkpoint": (_round_checkpoint, ConfigError),
    "local model checkpoint": (_model_checkpoint, ConfigError),
    "tiny_cnn weights": (_encoder_weights("tiny_cnn"), EncoderError),
    "resnet50_trunc weights": (_encoder_weights("resnet50_trunc"), EncoderError),
    "efficientnet_lite0 weights": (_encoder_weights("efficientnet_lite0"), EncoderError),
}
REFUSAL = re.compile(r"pickled|weights.only|not an intact|Weights only load failed", re.I)


@pytest.mark.parametrize("gadget", sorted(GADGETS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_payloads_are_real(tmp_path: Path, fmt: str, gadget: str) -> None:
    """Control: unpickled the unsafe way, each file does run its code."""
    marker = tmp_path / "marker"
    path = _write_payload(tmp_path / "evil.pt", fmt, GADGETS[gadget](marker))
    if fmt == "raw-pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, map_location="cpu", weights_only=False)
    assert marker.read_text() == "unpickled"


@pytest.mark.parametrize("gadget", sorted(GADGETS))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_every_loader_refuses_a_pickled_payload(
    tmp_path: Path, loader: str, fmt: str, gadget: str
) -> None:
    marker = tmp_path / "marker"
    path = _write_payload(tmp_path / "evil.pt", fmt, GADGETS[gadget](marker))
    load, error = LOADERS[loader]
    with pytest.raises(error) as caught:
        load(path)
    message = str(caught.value)
    assert str(path) in message, f"{loader}: the error must name the file: {message}"
    assert REFUSAL.search(message), f"{loader}: unclear refusal: {message}"
    assert not marker.exists(), f"{loader} ran the payload's code"


UNSAFE_ADVICE = re.compile(r"weights_only` set to `False`|\x1b\[")
"""torch's refusal text: terminal escapes and the advice to re-run the load unsafely."""


@pytest.mark.parametrize(
    "loader",
    sorted(LOADERS),
)
def test_no_refusal_advises_loading_the_file_unsafely(tmp_path: Path, loader: str) -> None:
    """A hospital reading "re-run with weights_only=False" might do just that."""
    path = _write_payload(tmp_path / "evil.pt", "torch-zip", WritesMarker(tmp_path / "marker"))
    load, error = LOADERS[loader]
    with pytest.raises(error) as caught:
        load(path)
    assert not UNSAFE_ADVICE.search(str(caught.value)), str(caught.value)


@pytest.mark.parametrize("fmt", ("torch-zip", "fedpath-shaped"))
def test_encoder_refusal_names_the_reason_not_torchs_unsafe_advice(
    tmp_path: Path, fmt: str
) -> None:
    from fedpath.client.embed.registry import load_encoder

    path = _write_payload(tmp_path / "evil.pt", fmt, WritesMarker(tmp_path / "marker"))
    refusal = r"refused by weights-only loading: it holds pickled Python objects"
    with pytest.raises(EncoderError, match=refusal) as caught:
        load_encoder("tiny_cnn", weights_path=path)
    assert "two options" not in str(caught.value)
    assert "fedpath never unpickles code from a file" in str(caught.value)


def test_a_plain_state_dict_still_loads(tmp_path: Path) -> None:
    """The refusal is about pickled objects, not about weights files."""
    from fedpath.client.embed.models import TinyCNN
    from fedpath.client.embed.registry import load_encoder

    path = tmp_path / "tiny.pt"
    torch.save(TinyCNN().state_dict(), path)
    assert load_encoder("tiny_cnn", weights_path=path).weights_path == path


@pytest.mark.parametrize("gadget", sorted(GADGETS))
def test_a_pickle_dressed_as_a_torchscript_encoder_is_refused(tmp_path: Path, gadget: str) -> None:
    """A zip with TorchScript's member names reaches ``torch.jit.load``, whose unpickler only
    builds TorchScript types: the payload's callable is an unknown type, not a call."""
    from fedpath.client.embed.registry import load_encoder

    marker = tmp_path / "marker"
    plain = _write_payload(tmp_path / "plain.pt", "torch-zip", GADGETS[gadget](marker))
    path = tmp_path / "encoder.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
        dst.writestr("archive/constants.pkl", pickle.dumps(GADGETS[gadget](marker), protocol=2))
        dst.writestr("archive/code/__torch__/m.py", "")
    with pytest.raises(EncoderError, match=re.escape(str(path))):
        load_encoder(str(path))
    assert not marker.exists()


def test_a_plain_pickle_is_not_taken_for_a_torchscript_encoder(tmp_path: Path) -> None:
    from fedpath.client.embed.registry import load_encoder

    marker = tmp_path / "marker"
    path = _write_payload(tmp_path / "encoder.pt", "raw-pickle", WritesMarker(marker))
    with pytest.raises(EncoderError, match="not a TorchScript archive"):
        load_encoder(str(path))
    assert not marker.exists()


# -- received: model arrays in a Flower message ------------------------------------------------


def _pickled_npy(gadget: Any) -> bytes:
    """An .npy of dtype object: numpy pickles its elements (what allow_pickle=True would run)."""
    buffer = io.BytesIO()
    np.save(buffer, np.array([gadget], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def test_a_received_array_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    from flwr.app import Array

    marker = tmp_path / "marker"
    array = Array(
        dtype="object", shape=(1,), stype="numpy.ndarray", data=_pickled_npy(WritesMarker(marker))
    )
    with pytest.raises(ValueError, match="allow_pickle=False"):
        array.numpy()
    assert not marker.exists()


@pytest.mark.usefixtures("flower_task")
def test_a_train_message_carrying_a_pickled_array_gets_an_error_reply(tmp_path: Path) -> None:
    """What a hostile coordinator could send a hospital: the ClientApp refuses, nothing runs."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    from fedpath.client.app import app
    from fedpath.server.config import RunConfig
    from fedpath.server.federated_run import initial_arrays
    from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site

    spec = SyntheticSiteSpec(n_slides=6, feature_dim=8, patches=(5, 10))
    site = write_synthetic_site(tmp_path / "site", spec, seed=0)
    marker = tmp_path / "marker"
    cfg = RunConfig(local_epochs=1)
    arrays = {k: Array(v) for k, v in initial_arrays(cfg, spec.feature_dim).items()}
    first = sorted(arrays)[0]
    arrays[first] = Array(
        dtype="object", shape=(1,), stype="numpy.ndarray", data=_pickled_npy(ExecsCode(marker))
    )
    instructions = {
        "server_round": 1,
        "model": cfg.model_config_for(spec.feature_dim).model_dump(mode="json"),
        "train": cfg.train_config().model_dump(mode="json"),
    }
    message = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(arrays),
                "config": ConfigRecord({"instructions": json.dumps(instructions)}),
            }
        ),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"data-path": str(site), "site": "site_a"},
        state=RecordDict(),
        run_config={},
    )
    reply = app(message, context)
    assert reply.has_error()
    assert reply.error.reason.startswith("site_a: ") and "allow_pickle=False" in reply.error.reason
    assert not marker.exists()


# -- the source audit --------------------------------------------------------------------------

AUDITED = ("common", "client", "server", "deploy", "bench")
FORBIDDEN_CALLS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "cPickle.load",
    "cPickle.loads",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "joblib.load",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "pd.read_pickle",
    "pandas.read_pickle",
    "torch.serialization.add_safe_globals",
    "torch.serialization.safe_globals",
}
TORCHSCRIPT_LOADERS = {"client/embed/registry.py"}
"""``torch.jit.load`` builds TorchScript types only (no arbitrary Python callables); it is how
foundation-model encoders are shared, and only the encoder registry may call it."""


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword_is(call: ast.Call, name: str, value: bool) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
        for k in call.keywords
    )


def audit_source(path: Path, rel: str) -> list[str]:
    """Unsafe loads in one Python file, as ``file:line: what`` strings."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in {"pickle", "dill", "joblib"}:
            names = {a.name for a in node.names} & {"load", "loads", "Unpickler"}
            if names:
                problems.append(f"{rel}:{node.lineno}: imports {node.module}.{sorted(names)}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{rel}:{node.lineno}"
        if name in FORBIDDEN_CALLS:
            problems.append(f"{where}: calls {name}")
        elif name == "torch.load" and not _keyword_is(node, "weights_only", True):
            problems.append(f"{where}: torch.load without weights_only=True")
        elif name in {"np.load", "numpy.load"} and not _keyword_is(node, "allow_pickle", False):
            problems.append(f"{where}: {name} without allow_pickle=False")
        elif name == "torch.jit.load" and rel not in TORCHSCRIPT_LOADERS:
            problems.append(f"{where}: torch.jit.load outside the encoder registry")
    return problems


@pytest.mark.slow
def test_no_source_file_unpickles() -> None:
    problems: list[str] = []
    checked = 0
    for top in AUDITED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "_cache" in path.parts:
                continue
            checked += 1
            problems += audit_source(path, path.relative_to(ROOT).as_posix())
    assert checked > 50
    assert problems == []


def test_the_audit_flags_each_unsafe_form(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle, torch, numpy as np\n"
        "from pickle import loads\n"
        "torch.load('x')\n"
        "torch.load('x', weights_only=False)\n"
        "torch.load('x', weights_only=True)\n"
        "np.load('x.npy')\n"
        "np.load('x.npy', allow_pickle=False)\n"
        "pickle.load(open('x', 'rb'))\n"
        "torch.jit.load('m.pt')\n"
        "torch.serialization.add_safe_globals([object])\n",
        encoding="utf-8",
    )
    lines = sorted(int(p.split(":")[1]) for p in audit_source(bad, "bad.py"))
    assert lines == [2, 3, 4, 6, 8, 9, 10]
