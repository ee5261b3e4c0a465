"""CTransPath: a Swin-T whose patch embedding is a small convolutional stem, 768-d output.

CTransPath was trained with the authors' patched timm 0.5.4 (``SwinTransformer`` with a
``ConvStem`` instead of the 4×4 patch convolution) and is shared as ``{"model": state_dict}``
in that layout, so the parameter names here follow it: ``patch_embed.proj.{0,1,3,4,6}``,
``layers.S.blocks.B.attn.relative_position_bias_table``, ``layers.S.downsample.reduction``, ...
The file also holds the derived buffers ``relative_position_index`` and ``attn_mask``; they are
recomputed here (``init_buffers``) rather than trusted from the file.

Shapes in ``forward`` depend only on the configuration (window partition, shifted windows,
patch merging), so the model traces and exports; the stem runs in float32 under autocast.
"""

from __future__ import annotations

import torch
from torch import nn

from fedpath.client.embed.hyperparams import SwinConfig
from fedpath.client.embed.models import fold_conv_bn
from fedpath.client.embed.vit import Mlp, float32_region


class ConvStem(nn.Module):
    """Two stride-2 3×3 conv+BN+ReLU, a 1×1 conv to ``dim``, then LayerNorm over tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 8:
            raise ValueError(f"ConvStem needs a width divisible by 8, got {dim}")
        c = dim // 8
        self.proj = nn.Sequential(
            nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * c, dim, 1),
        )
        self.norm = nn.LayerNorm(dim)

    def fold_batchnorm(self) -> None:
        fold_conv_bn(self.proj, "0", "1")
        fold_conv_bn(self.proj, "3", "4")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def _relative_index(window: int) -> torch.Tensor:
    """(w², w²) index into the ((2w-1)², heads) relative position bias table.

    Computed on the CPU (then moved by the caller): indexing on the meta device would pull in
    torch's reference kernels, seconds of import for a shape check.
    """
    axis = torch.arange(window, device="cpu")
    coords = torch.stack(torch.meshgrid(axis, axis, indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) → (B·nW, w·w, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _unwindows(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``_windows``: (B·nW, w·w, C) → (B, H, W, C)."""
    c = x.shape[-1]
    x = x.reshape(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def _shift_mask(size: int, window: int, shift: int) -> torch.Tensor:
    """(nW, w², w²) additive mask: -100 between tokens that came from different regions."""
    regions = torch.zeros(1, size, size, 1, device="cpu")
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            regions[:, rows, cols, :] = label
            label += 1
    flat = _windows(regions, window).squeeze(-1)
    diff = flat.unsqueeze(1) - flat.unsqueeze(2)
    return (diff != 0).float() * -100.0


class WindowAttention(nn.Module):
    """Multi-head attention inside windows with a learned relative position bias."""

    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        index = _relative_index(window).to(torch.get_default_device())
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        windows, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(windows, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            groups = mask.shape[0]
            attn = attn.reshape(-1, groups, self.num_heads, tokens, tokens) + mask[None, :, None]
            attn = attn.reshape(-1, self.num_heads, tokens, tokens)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(windows, tokens, dim))


class SwinBlock(nn.Module):
    """(Shifted-)window attention + MLP, pre-norm, on a ``size``×``size`` token grid."""

    def __init__(self, dim: int, size: int, num_heads: int, window: int, shift: int) -> None:
        super().__init__()
        if size <= window:  # the whole grid is one window: no shift (timm's rule)
            window, shift = size, 0
        self.size, self.window, self.shift = size, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, "gelu")
        mask = _shift_mask(size, window, shift).to(torch.get_default_device()) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def init_buffers(self) -> None:
        self.attn.relative_position_index = _relative_index(self.window)
        if self.shift:
            self.attn_mask = _shift_mask(self.size, self.window, self.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, dim = x.shape
        size, window, shift = self.size, self.window, self.shift
        y = self.norm1(x).reshape(batch, size, size, dim)
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = _unwindows(self.attn(_windows(y, window), self.attn_mask), window, size, size)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + y.reshape(batch, size * size, dim)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2×2 neighbouring tokens concatenated (timm's order), normalised, projected to 2·dim."""

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, dim = x.shape
        x = x.reshape(batch, self.size, self.size, dim)
        parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
        x = torch.cat(parts, dim=-1).reshape(batch, -1, 4 * dim)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """timm 0.5.4 ``BasicLayer``: blocks with alternating shift, then optional merging."""

    def __init__(self, cfg: SwinConfig, stage: int) -> None:
        super().__init__()
        dim = cfg.embed_dim * 2**stage
        size = cfg.img_size // 4 // 2**stage
        shift = cfg.window // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, size, cfg.num_heads[stage], cfg.window, 0 if i % 2 == 0 else shift)
            for i in range(cfg.depths[stage])
        )
        last = stage == len(cfg.depths) - 1
        self.downsample = None if last else PatchMerging(dim, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class CTransPath(nn.Module):
    """Normalised (B, 3, 224, 224) batch → (B, 768) average-pooled Swin features (float32)."""

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        if cfg.img_size % (4 * 2 ** (len(cfg.depths) - 1)):
            raise ValueError(f"image size {cfg.img_size} does not divide into the Swin stages")
        self.cfg = cfg
        self.patch_embed = ConvStem(cfg.embed_dim)
        self.layers = nn.Sequential(*[SwinStage(cfg, s) for s in range(len(cfg.depths))])
        self.norm = nn.LayerNorm(cfg.feature_dim)
        self.feature_dim = cfg.feature_dim

    def init_buffers(self) -> None:
        """Recompute the derived buffers (after a meta-device build, or instead of the file's)."""
        for module in self.modules():
            if isinstance(module, SwinBlock):
                module.init_buffers()

    def fold_batchnorm(self) -> None:
        """Fold the stem's BatchNorms into its convolutions (inference graph; eval mode)."""
        self.patch_embed.fold_batchnorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with float32_region(x):
            x = self.patch_embed(x.float())
        x = self.norm(self.layers(x))
        return x.mean(dim=1).float()
