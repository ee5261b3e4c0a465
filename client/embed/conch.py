"""CONCH's vision tower as used for patch features: ViT-B/16 trunk + attentional pooler.

CONCH (a CoCa model) pools the trunk's tokens with one learned query through cross-attention
(``attn_pool_contrast``), then a LayerNorm (``ln_contrast``): the 512-d vector its authors and
CLAM/TRIDENT use as patch feature (``encode_image(proj_contrast=False, normalize=False)``).
The text tower, captioning pooler and contrastive projection are not needed for that and are
not built. Parameter names follow the checkpoint's ``visual.`` sub-tree; the pooler's
projections keep ``nn.MultiheadAttention``'s names for separate key/value widths
(``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``, ``in_proj_bias``, ``out_proj``) but
run as plain matmuls + ``scaled_dot_product_attention`` so the model traces and exports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedpath.client.embed.vit import VisionTransformer, ViTConfig


class AttentionalPooler(nn.Module):
    """Learned queries attending over normalised context tokens (open_clip's pooler)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Parameter(torch.zeros(n_queries, d_model))
        self.attn = _CrossAttention(d_model, context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.ln_k(x)
        query = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(query, context, self.n_head)


class _CrossAttention(nn.Module):
    """The parameters of ``nn.MultiheadAttention(d, h, kdim=c, vdim=c)``, batch-first maths."""

    def __init__(self, d_model: int, context_dim: int) -> None:
        super().__init__()
        self.q_proj_weight = nn.Parameter(torch.zeros(d_model, d_model))
        self.k_proj_weight = nn.Parameter(torch.zeros(d_model, context_dim))
        self.v_proj_weight = nn.Parameter(torch.zeros(d_model, context_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, query: torch.Tensor, context: torch.Tensor, heads: int) -> torch.Tensor:
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(query, self.q_proj_weight, bq)
        k = F.linear(context, self.k_proj_weight, bk)
        v = F.linear(context, self.v_proj_weight, bv)
        batch, n_q, dim = q.shape
        q = q.reshape(batch, n_q, heads, dim // heads).transpose(1, 2)
        k = k.reshape(batch, k.shape[1], heads, dim // heads).transpose(1, 2)
        v = v.reshape(batch, v.shape[1], heads, dim // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, n_q, dim))


class ConchVision(nn.Module):
    """Normalised (B, 3, 448, 448) batch → (B, 512) CONCH patch features (float32)."""

    def __init__(self, trunk: ViTConfig, embed_dim: int = 512, heads: int = 8) -> None:
        super().__init__()
        if trunk.pool != "tokens":
            raise ValueError("CONCH pools all trunk tokens: the trunk must use pool='tokens'")
        self.trunk = VisionTransformer(trunk)
        self.attn_pool_contrast = AttentionalPooler(embed_dim, trunk.embed_dim, heads, 1)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.feature_dim = embed_dim

    def fold_batchnorm(self) -> None:
        """Inference-graph folding hook: the trunk folds its layer-scale (it has none in CONCH)."""
        self.trunk.fold_batchnorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        pooled = self.attn_pool_contrast(tokens)[:, 0]
        return self.ln_contrast(pooled).float()
