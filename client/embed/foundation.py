"""Building the pathology foundation encoders and loading them from the hospital's weights.

The entries themselves (architecture hyper-parameters from each model's published timm /
HuggingFace configuration, input size, normalisation, resolution trained at, output width,
checkpoint layout, licence, download page) are plain data in ``client.embed.catalog``. fedpath
never downloads weights: the hospital accepts the licence on the model's page, downloads the
file or snapshot folder itself and passes it with ``--weights``.

Models are built on the meta device and the checkpoint's tensors are assigned to them, so a
1.1-billion-parameter encoder is never initialised randomly first (no time, no second copy in
memory).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedpath.client.embed.catalog import (
    FOUNDATION_MODELS,
    H_OPTIMUS_MEAN,
    H_OPTIMUS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    FoundationModel,
)
from fedpath.client.embed.checkpoints import (
    fit_state_dict,
    hf_keys,
    locate_weights,
    prefixed_keys,
    read_state_dict,
    timm_keys,
)
from fedpath.client.embed.conch import ConchVision
from fedpath.client.embed.hyperparams import SwinConfig, ViTConfig
from fedpath.client.embed.swin import CTransPath
from fedpath.client.embed.vit import VisionTransformer
from fedpath.common.errors import EncoderError

__all__ = [
    "FOUNDATION_MODELS",
    "H_OPTIMUS_MEAN",
    "H_OPTIMUS_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "FoundationModel",
    "LoadedFoundation",
    "build_model",
    "load_foundation",
]

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


def build_model(entry: FoundationModel) -> nn.Module:
    """The entry's architecture with uninitialised weights on the current default device."""
    config = entry.config
    if isinstance(config, SwinConfig):
        return CTransPath(config)
    if entry.layout == "conch":
        return ConchVision(config)
    return VisionTransformer(config)


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
        model = build_model(entry)
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
