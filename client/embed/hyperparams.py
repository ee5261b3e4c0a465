"""Hyper-parameters of the encoder architectures, as plain data (no torch import).

Kept apart from the modules that build the networks so that listing the encoders
(``fedpath encoders``) and describing them never imports torch (seconds of start-up).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Pool = Literal["token", "token+mean", "tokens"]
"""What ``forward`` returns: the class token, class token ++ mean of patch tokens, or all tokens."""


@dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of one ViT checkpoint; ``mlp_hidden`` is fc1's output width as stored.

    For ``mlp="swiglu_packed"`` fc1 holds both SwiGLU halves (gate first), so fc2's input width
    is ``mlp_hidden // 2`` (timm's ``SwiGLUPacked``).
    """

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    mlp: Literal["gelu", "swiglu_packed"] = "gelu"
    layer_scale: bool = False
    reg_tokens: int = 0
    no_embed_class: bool = False
    norm_eps: float = 1e-6
    pool: Pool = "token"

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def prefix_tokens(self) -> int:
        return 1 + self.reg_tokens

    @property
    def pos_tokens(self) -> int:
        """Rows of ``pos_embed``: the patches, plus the class token unless ``no_embed_class``."""
        patches = self.grid * self.grid
        return patches if self.no_embed_class else patches + self.prefix_tokens

    @property
    def feature_dim(self) -> int:
        return 2 * self.embed_dim if self.pool == "token+mean" else self.embed_dim

    def reduced(self, depth: int, embed_dim: int, num_heads: int, grid: int) -> ViTConfig:
        """Same code path, smaller: for tests that load and run real weights on a CI machine."""
        hidden = max(2, round(self.mlp_hidden * embed_dim / self.embed_dim / 2) * 2)
        return replace(
            self,
            img_size=grid * self.patch_size,
            depth=depth,
            embed_dim=embed_dim,
            num_heads=num_heads,
            mlp_hidden=hidden,
        )


@dataclass(frozen=True)
class SwinConfig:
    """Swin-T hyper-parameters (CTransPath: 96-d stem, depths 2-2-6-2, window 7)."""

    img_size: int = 224
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window: int = 7

    @property
    def feature_dim(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def reduced(
        self,
        embed_dim: int,
        depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        img_size: int,
        window: int,
    ) -> SwinConfig:
        """Same code path, narrower and shallower: for tests that load real weights on CI."""
        return replace(
            self,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            img_size=img_size,
            window=window,
        )
