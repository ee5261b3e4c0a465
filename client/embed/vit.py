"""One Vision Transformer whose parameter names match timm's state dicts.

Most pathology foundation models (UNI, UNI2-h, Virchow2, H-optimus, Prov-GigaPath, CONCH's
trunk) are timm ``VisionTransformer`` checkpoints; timm itself cannot be installed beside the CPU
torch wheel (it imports torchvision), so the few variants they use are written out here:
layer-scale, register tokens, SwiGLU with fc1 packing both halves, position embeddings that
skip the prefix tokens (``no_embed_class``). Names follow timm (``patch_embed.proj``,
``blocks.N.attn.qkv``, ``blocks.N.ls1.gamma``, ...) so their files load without renaming.

The forward has no data-dependent Python control flow (every branch depends only on the
configuration), attention is ``F.scaled_dot_product_attention``, so the model traces with
``torch.jit.trace`` and exports to ONNX. The patch embedding and position embedding run in
float32 even under autocast: rounding normalised pixels to bfloat16 costs more accuracy than
all later layers together (see ``client.embed.models``), for a negligible share of the FLOPs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedpath.client.embed.hyperparams import Pool, ViTConfig

__all__ = ["Pool", "ViTConfig", "VisionTransformer", "float32_region", "resample_pos_embed"]

_AUTOCAST_DEVICES = ("cpu", "cuda", "mps", "xpu")


def float32_region(x: torch.Tensor) -> torch.autocast:
    """Autocast off for the enclosed ops on ``x``'s device type (a static Python string).

    Devices without autocast (``meta``, used for shape checks) get a no-op CPU region.
    """
    kind = x.device.type
    return torch.autocast(kind if kind in _AUTOCAST_DEVICES else "cpu", enabled=False)


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens (B, N, D) with one strided convolution."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm ``Attention``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class LayerScale(nn.Module):
    """Per-channel residual scaling (timm ``LayerScale``: parameter ``gamma``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 → GELU → fc2, or fc1 → SiLU(first half) · second half → fc2 (``SwiGLUPacked``)."""

    def __init__(self, dim: int, hidden: int, kind: str) -> None:
        super().__init__()
        self.swiglu = kind == "swiglu_packed"
        if self.swiglu and hidden % 2:
            raise ValueError(f"packed SwiGLU needs an even hidden width, got {hidden}")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden // 2 if self.swiglu else hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.swiglu:
            gate, value = x.chunk(2, dim=-1)
            x = F.silu(gate) * value
        else:
            x = F.gelu(x)
        return self.fc2(x)


class Block(nn.Module):
    """Pre-norm transformer block with optional layer-scale (``ls1``/``ls2``)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads)
        self.ls1: nn.Module = LayerScale(dim) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, cfg.mlp_hidden, cfg.mlp)
        self.ls2: nn.Module = LayerScale(dim) if cfg.layer_scale else nn.Identity()

    @torch.no_grad()
    def fold_layer_scale(self) -> None:
        """Fold ls1/ls2 into the linear layers before them (``diag(gamma) @ W``, ``gamma * b``).

        Exact up to float rounding, one multiply less per block, and it avoids a oneDNN-graph
        fusion bug: a frozen ``linear(x) * gamma`` fails at run time in TorchScript with oneDNN
        fusion on (torch 2.13, "vector::_M_range_check").
        """
        for scale_name, linear in (("ls1", self.attn.proj), ("ls2", self.mlp.fc2)):
            scale = getattr(self, scale_name)
            if isinstance(scale, LayerScale):
                linear.weight.mul_(scale.gamma.unsqueeze(1))
                linear.bias.mul_(scale.gamma)
                setattr(self, scale_name, nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """timm-layout ViT mapping a normalised (B, 3, S, S) batch to float32 features."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.img_size % cfg.patch_size or cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"inconsistent ViT configuration: {cfg}")
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = (
            nn.Parameter(torch.zeros(1, cfg.reg_tokens, dim)) if cfg.reg_tokens else None
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_tokens, dim))
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.feature_dim = cfg.feature_dim

    def fold_batchnorm(self) -> None:
        """Inference-graph folding hook (the name the tracing/export code calls on any model).

        A ViT has no BatchNorm; what folds here is layer-scale into the preceding linear layers
        (see ``Block.fold_layer_scale``), on the float32 weights before any autocast.
        """
        for block in self.blocks:
            block.fold_layer_scale()

    def _prefix(self, batch: int) -> torch.Tensor:
        tokens = [self.cls_token.expand(batch, -1, -1)]
        if self.reg_token is not None:
            tokens.append(self.reg_token.expand(batch, -1, -1))
        return torch.cat(tokens, dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: (B, prefix + patches, D)."""
        with float32_region(x):
            x = self.patch_embed(x.float())
            prefix = self._prefix(x.shape[0])
            if self.cfg.no_embed_class:
                x = torch.cat([prefix, x + self.pos_embed], dim=1)
            else:
                x = torch.cat([prefix, x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(x)
        if self.cfg.pool == "tokens":
            return tokens.float()
        cls = tokens[:, 0]
        if self.cfg.pool == "token+mean":
            patches = tokens[:, self.cfg.prefix_tokens :].mean(dim=1)
            return torch.cat([cls, patches], dim=-1).float()
        return cls.float()


def resample_pos_embed(pos: torch.Tensor, prefix: int, grid: int) -> torch.Tensor:
    """Bicubic resampling of a (1, prefix + g*g, D) position table to a ``grid``×``grid`` one.

    Done once on the state dict at load time (never in ``forward``), for a checkpoint whose
    table was trained on another patch grid than the input size fedpath feeds it.
    """
    head, table = pos[:, :prefix], pos[:, prefix:]
    old = math.isqrt(table.shape[1])
    if old * old != table.shape[1]:
        raise ValueError(f"position table of {table.shape[1]} tokens is not a square grid")
    dim = table.shape[-1]
    image = table.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    table = image.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos.dtype)
    return torch.cat([head, table], dim=1)
