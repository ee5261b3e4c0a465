"""The pathology foundation encoders hospitals use, one entry each, loaded from local weights.

Each entry records what a feature file's provenance and a coordinator need to know without
reading any weights: the architecture and its hyper-parameters (from the model's published
timm/HuggingFace configuration), the input size and normalisation its authors use, the
resolution it was trained at, its output width, the layout of its checkpoint, its licence and
the page where a hospital requests and downloads the weights. fedpath never downloads them: the
hospital accepts the licence on that page, downloads the file or snapshot folder itself and
passes it with ``--weights``.

Models are built on the meta device and the checkpoint's tensors are assigned to them, so a
1.1-billion-parameter encoder is never initialised randomly first (no time, no second copy in
memory).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from client.embed.checkpoints import (
    fit_state_dict,
    hf_keys,
    locate_weights,
    prefixed_keys,
    read_state_dict,
    timm_keys,
)
from client.embed.conch import ConchVision
from client.embed.swin import CTransPath, SwinConfig
from client.embed.vit import VisionTransformer, ViTConfig
from common.errors import EncoderError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
H_OPTIMUS_MEAN: tuple[float, float, float] = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD: tuple[float, float, float] = (0.211883, 0.230117, 0.177517)

Layout = Literal["timm", "hf_vit", "hf_dinov2", "conch", "ctranspath"]

_LAYOUT_TEXT: dict[str, str] = {
    "timm": "timm VisionTransformer state dict",
    "hf_vit": "HuggingFace transformers ViTModel",
    "hf_dinov2": "HuggingFace transformers Dinov2Model",
    "conch": "CONCH (CoCa) state dict; vision tower under visual.",
    "ctranspath": "TransPath timm-0.5.4 Swin state dict under 'model'",
}
_IGNORED: dict[str, re.Pattern[str] | None] = {
    "timm": None,
    "hf_vit": re.compile(r"pooler\..*"),
    "hf_dinov2": re.compile(r"pooler\..*|embeddings\.mask_token"),
    # Text tower, text decoder, captioning pooler and contrastive projection: not used for
    # patch features (encode_image(proj_contrast=False)).
    "conch": re.compile(
        r"text\..*|text_decoder\..*|logit_scale|visual\.attn_pool_caption\..*"
        r"|visual\.ln_caption\..*|visual\.proj_contrast"
    ),
    # Derived buffers timm 0.5.4 saved with the weights; recomputed, not trusted.
    "ctranspath": re.compile(r".*\.relative_position_index|.*\.attn_mask"),
}


@dataclass(frozen=True)
class FoundationModel:
    """One registry entry: everything known about an encoder before its weights are read."""

    id: str
    name: str
    architecture: str
    config: ViTConfig | SwinConfig
    layout: Layout
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float
    magnification: str
    licence: str
    source: str
    weight_files: tuple[str, ...]
    feature_dim: int
    output: str

    @property
    def input_size(self) -> int:
        return self.config.img_size

    @property
    def checkpoint_layout(self) -> str:
        return f"{_LAYOUT_TEXT[self.layout]} ({' or '.join(self.weight_files)})"

    def build(self) -> nn.Module:
        """The architecture with uninitialised weights on the current default device."""
        config = self.config
        if isinstance(config, SwinConfig):
            return CTransPath(config)
        if self.layout == "conch":
            return ConchVision(config)
        return VisionTransformer(config)


def _vit(**kwargs: object) -> ViTConfig:
    return ViTConfig(**kwargs)  # type: ignore[arg-type]


_NC_ND = "CC-BY-NC-ND-4.0"
_HF = "https://huggingface.co/"

FOUNDATION_MODELS: dict[str, FoundationModel] = {
    m.id: m
    for m in (
        FoundationModel(
            id="uni",
            name="UNI",
            architecture="ViT-L/16, layer-scale (DINOv2)",
            config=_vit(
                img_size=224,
                patch_size=16,
                embed_dim=1024,
                depth=24,
                num_heads=16,
                mlp_hidden=4096,
                layer_scale=True,
            ),
            layout="timm",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            mpp=0.5,
            magnification="20x",
            licence=_NC_ND,
            source=_HF + "MahmoodLab/UNI",
            weight_files=("pytorch_model.bin",),
            feature_dim=1024,
            output="class token",
        ),
        FoundationModel(
            id="uni2_h",
            name="UNI2-h",
            architecture="ViT-H/14-style (1536-d, 24 blocks), SwiGLU, 8 registers",
            config=_vit(
                img_size=224,
                patch_size=14,
                embed_dim=1536,
                depth=24,
                num_heads=24,
                mlp_hidden=8192,
                mlp="swiglu_packed",
                layer_scale=True,
                reg_tokens=8,
                no_embed_class=True,
            ),
            layout="timm",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            mpp=0.5,
            magnification="20x",
            licence=_NC_ND,
            source=_HF + "MahmoodLab/UNI2-h",
            weight_files=("pytorch_model.bin",),
            feature_dim=1536,
            output="class token",
        ),
        FoundationModel(
            id="virchow2",
            name="Virchow2",
            architecture="ViT-H/14, SwiGLU, 4 registers",
            config=_vit(
                img_size=224,
                patch_size=14,
                embed_dim=1280,
                depth=32,
                num_heads=16,
                mlp_hidden=6832,
                mlp="swiglu_packed",
                layer_scale=True,
                reg_tokens=4,
                pool="token+mean",
            ),
            layout="timm",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            mpp=0.5,
            magnification="20x (trained at 5-40x)",
            licence=_NC_ND,
            source=_HF + "paige-ai/Virchow2",
            weight_files=("model.safetensors", "pytorch_model.bin"),
            feature_dim=2560,
            output="class token ++ mean of patch tokens",
        ),
        FoundationModel(
            id="h_optimus_0",
            name="H-optimus-0",
            architecture="ViT-g/14 (DINOv2), SwiGLU, 4 registers",
            config=_vit(
                img_size=224,
                patch_size=14,
                embed_dim=1536,
                depth=40,
                num_heads=24,
                mlp_hidden=8192,
                mlp="swiglu_packed",
                layer_scale=True,
                reg_tokens=4,
                no_embed_class=True,
            ),
            layout="timm",
            mean=H_OPTIMUS_MEAN,
            std=H_OPTIMUS_STD,
            mpp=0.5,
            magnification="20x",
            licence="Apache-2.0",
            source=_HF + "bioptimus/H-optimus-0",
            weight_files=("model.safetensors", "pytorch_model.bin"),
            feature_dim=1536,
            output="class token",
        ),
        FoundationModel(
            id="h_optimus_1",
            name="H-optimus-1",
            architecture="ViT-g/14 (DINOv2), SwiGLU, 4 registers",
            config=_vit(
                img_size=224,
                patch_size=14,
                embed_dim=1536,
                depth=40,
                num_heads=24,
                mlp_hidden=8192,
                mlp="swiglu_packed",
                layer_scale=True,
                reg_tokens=4,
                no_embed_class=True,
            ),
            layout="timm",
            mean=H_OPTIMUS_MEAN,
            std=H_OPTIMUS_STD,
            mpp=0.5,
            magnification="20x",
            licence="Bioptimus academic",
            source=_HF + "bioptimus/H-optimus-1",
            weight_files=("model.safetensors", "pytorch_model.bin"),
            feature_dim=1536,
            output="class token",
        ),
        FoundationModel(
            id="prov_gigapath",
            name="Prov-GigaPath (tile encoder)",
            architecture="ViT-g/16 (DINOv2), SwiGLU",
            config=_vit(
                img_size=224,
                patch_size=16,
                embed_dim=1536,
                depth=40,
                num_heads=24,
                mlp_hidden=8192,
                mlp="swiglu_packed",
                layer_scale=True,
            ),
            layout="timm",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            mpp=0.5,
            magnification="20x",
            licence="Apache-2.0 + NC gate",
            source=_HF + "prov-gigapath/prov-gigapath",
            weight_files=("pytorch_model.bin",),
            feature_dim=1536,
            output="class token",
        ),
        FoundationModel(
            id="phikon",
            name="Phikon",
            architecture="ViT-B/16 (iBOT)",
            config=_vit(
                img_size=224,
                patch_size=16,
                embed_dim=768,
                depth=12,
                num_heads=12,
                mlp_hidden=3072,
                norm_eps=1e-12,
            ),
            layout="hf_vit",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            mpp=0.5,
            magnification="20x",
            licence="Owkin non-commercial",
            source=_HF + "owkin/phikon",
            weight_files=("model.safetensors", "pytorch_model.bin"),
            feature_dim=768,
            output="class token",
        ),
        FoundationModel(
            id="phikon_v2",
            name="Phikon-v2",
            architecture="ViT-L/16 (DINOv2), layer-scale",
            config=_vit(
                img_size=224,
                patch_size=16,
                embed_dim=1024,
                depth=24,
                num_heads=16,
                mlp_hidden=4096,
                layer_scale=True,
            ),
            layout="hf_dinov2",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            mpp=0.5,
            magnification="20x",
            licence="Owkin non-commercial",
            source=_HF + "owkin/phikon-v2",
            weight_files=("model.safetensors", "pytorch_model.bin"),
            feature_dim=1024,
            output="class token",
        ),
        FoundationModel(
            id="conch",
            name="CONCH (vision tower)",
            architecture="ViT-B/16 + attentional pooler (CoCa)",
            config=_vit(
                img_size=448,
                patch_size=16,
                embed_dim=768,
                depth=12,
                num_heads=12,
                mlp_hidden=3072,
                pool="tokens",
            ),
            layout="conch",
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
            mpp=0.5,
            magnification="20x",
            licence=_NC_ND,
            source=_HF + "MahmoodLab/CONCH",
            weight_files=("pytorch_model.bin",),
            feature_dim=512,
            output="pooled, before the contrastive projection",
        ),
        FoundationModel(
            id="ctranspath",
            name="CTransPath",
            architecture="Swin-T with a convolutional stem",
            config=SwinConfig(),
            layout="ctranspath",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            mpp=1.0,
            magnification="10x (as CLAM/TRIDENT run it)",
            licence="see TransPath repo",
            source="https://github.com/Xiyue-Wang/TransPath",
            weight_files=("ctranspath.pth",),
            feature_dim=768,
            output="mean of the final tokens",
        ),
    )
}
"""Registry entries, by id; hyper-parameters from each model's published configuration."""


@dataclass(frozen=True)
class LoadedFoundation:
    """A foundation model with its weights, and where they came from."""

    model: nn.Module
    sha256: str
    path: Path


def load_foundation(entry: FoundationModel, weights: Path | None) -> LoadedFoundation:
    """Build ``entry`` and fill it from the hospital's local weights file or snapshot folder.

    Raises ``EncoderError`` when no path is given, the path holds no usable weights file, or
    the checkpoint does not fit (missing/unexpected keys, shape mismatches: all named).
    """
    if weights is None:
        raise EncoderError(
            f"{entry.id}: no weights given. Request access and download them yourself from "
            f"{entry.source} ({entry.licence}), then pass the downloaded file or snapshot "
            f"folder: --weights PATH (embedding.weights_path in the prepare config); fedpath "
            "never downloads weights"
        )
    files = locate_weights(Path(weights), entry.id, entry.weight_files)
    state = _without_task_prefix(read_state_dict(files, entry.id), entry.layout)
    with torch.device("meta"):
        model = entry.build()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    fitted = fit_state_dict(
        state,
        expected,
        _source_keys(entry, state),
        ignored=_IGNORED[entry.layout],
        pos_tables=_pos_tables(entry),
        where=f"{entry.id} ({files.path}; expected {entry.checkpoint_layout} of {entry.name})",
    )
    del state
    model.load_state_dict(fitted, strict=True, assign=True)
    init_buffers = getattr(model, "init_buffers", None)
    if callable(init_buffers):
        init_buffers()  # derived buffers were built on the meta device
    return LoadedFoundation(model, files.sha256, files.path)


def _without_task_prefix(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """HuggingFace weights saved from a task model (``ViTForImageClassification``...) put the
    backbone under ``vit.`` / ``dinov2.``; the backbone keys are the same after that prefix."""
    if layout not in ("hf_vit", "hf_dinov2") or "embeddings.cls_token" in state:
        return state
    for prefix in ("vit.", "dinov2."):
        if f"{prefix}embeddings.cls_token" in state:
            return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}
    return state


def _source_keys(
    entry: FoundationModel, state: dict[str, torch.Tensor]
) -> Callable[[str], list[str]]:
    if entry.layout == "hf_vit":
        return hf_keys("vit")
    if entry.layout == "hf_dinov2":
        return hf_keys("dinov2")
    if entry.layout == "conch" and any(k.startswith("visual.") for k in state):
        return prefixed_keys("visual.")
    return timm_keys


def _pos_tables(entry: FoundationModel) -> dict[str, int]:
    if not isinstance(entry.config, ViTConfig):
        return {}
    prefix = 0 if entry.config.no_embed_class else entry.config.prefix_tokens
    key = "trunk.pos_embed" if entry.layout == "conch" else "pos_embed"
    return {key: prefix}
