"""Attention-MIL models over padded batches of feature bags (DESIGN §4.3).

One implementation, :class:`MILModel`, carries the parts every variant shares: the backbone
``h' = Dropout(ReLU(W₁h))``, the (gated) attention network, the masked softmax over each bag's
real patches and the slide vectors ``M = Σ A h'``. The variants differ only in how many
attention branches they have and in the two heads:

- :class:`ABMIL` (Ilse et al. 2018): one branch, one ``hidden → C`` slide classifier, no
  instance task;
- :class:`CLAMSB` (CLAM single branch): one branch, one ``hidden → C`` slide classifier and one
  **shared** ``hidden → 2`` instance classifier (MS-CLAM rather than CLAM's one per class);
- :class:`CLAMMB` (CLAM multi branch): one attention branch and one ``hidden → 1`` classifier
  per class (``logit_c = W_c M_c``), plus the same shared instance classifier.

Shapes are dictated by slide-level DP-SGD (§4.5): a batch is ``[B, N, D]`` with a ``[B, N]``
mask and every output keeps the slide on dimension 0, every operation acts within one row (no
BatchNorm, nothing that mixes slides) so Opacus' per-sample gradients are exact, and every
parameter is reached by a loss built from ``logits`` and ``instance_logits`` (Opacus refuses
parameters that received no per-sample gradient). Padding is made inert at the input (its
features are zeroed) and at every output (exact zeros, or ``-inf`` for raw scores), so a bag
gives the same outputs alone (physical batch 1, no mask) as inside any padded batch.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedpath.common.mil.config import ModelConfig

__all__ = [
    "ABMIL",
    "CLAMMB",
    "CLAMSB",
    "MILModel",
    "MILOutput",
    "MaskDropout",
    "Tanh",
    "build_model",
    "count_parameters",
]


@dataclass(frozen=True)
class MILOutput:
    """Everything one forward pass gives, slide on dimension 0 throughout.

    ``K`` is the number of attention branches: 1 for ``abmil`` and ``clam_sb``, ``C`` for
    ``clam_mb`` (branch ``c`` attends for class ``c``).
    """

    logits: Tensor
    """``[B, C]`` slide logits."""
    attention: Tensor
    """``[B, K, N]`` softmax over each bag's real patches; exactly 0 at padding."""
    attention_scores: Tensor
    """``[B, K, N]`` raw pre-softmax scores; ``-inf`` at padding."""
    instance_logits: Tensor
    """``[B, N, 2]`` per-patch normal/tumour logits; rows of padding are 0."""
    embeddings: Tensor
    """``[B, K, hidden]`` slide vectors ``M = Σ A h'``, one per branch."""


def _linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """``nn.Linear`` with CLAM's initialisation (Xavier-normal weight, zero bias).

    Drawn from torch's global generator, so ``torch.manual_seed`` makes a build reproducible
    without the module holding any random state of its own.
    """
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.xavier_normal_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class MaskDropout(nn.Dropout):
    """Inverted dropout with the distribution of ``nn.Dropout``, a cheap mask and a small trace.

    Why not ``nn.Dropout``: on CPU torch draws dropout noise with one serial Mersenne-Twister
    step per element and keeps it for backward as a float tensor of the activation's size.
    For the [N, 512] and [N, 256] activations of a slide that made dropout the largest single
    cost of a bfloat16 training step (bench/training.py), and 195 MiB per layer at 100,000
    patches. Here the keep mask comes from numpy's PCG64 bit generator, 8 or 16 bits per
    element (:func:`_keep_mask`), seeded by one draw from torch's global generator, so
    ``torch.manual_seed`` still makes runs reproducible; autograd keeps only the 1-byte mask.
    The keep probability is ``round(65536·(1 − p)) / 65536`` (exact for p = 0.25, 0.5, …,
    within 1.6e-5 otherwise) and kept values are scaled by its inverse, so the expectation is
    the input exactly. Other devices, and p so close to 1 that no threshold is left, use
    ``nn.Dropout`` itself.
    """

    def forward(self, x: Tensor) -> Tensor:
        return combined_dropout(x, (self,))


def combined_dropout(x: Tensor, layers: tuple[MaskDropout, ...]) -> Tensor:
    """``layers[-1](… layers[0](x))`` with one combined mask: the masks are drawn in order, as
    applying the layers one by one would, but multiplied into ``x`` (and kept) only once."""
    active = [layer for layer in layers if layer.training and layer.p > 0.0]
    if not active:
        return x
    thresholds = [round(65536 * (1.0 - layer.p)) for layer in active]
    if x.device.type != "cpu" or 0 in thresholds:
        for layer in active:
            x = nn.Dropout.forward(layer, x)
        return x
    n = math.prod(x.shape)
    keep: np.ndarray | None = None
    scale = 1.0
    for threshold in thresholds:
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
        drawn = _keep_mask(n, threshold, seed)
        keep = drawn if keep is None else np.logical_and(keep, drawn, out=keep)
        scale *= 65536 / threshold
    assert keep is not None
    return _ScaleByMask.apply(x, torch.from_numpy(keep).reshape(x.shape), scale)


def _keep_mask(n: int, threshold: int, seed: int, chunk: int = 1 << 22) -> np.ndarray:
    """``n`` booleans, each True with probability ``threshold / 65536``, from one PCG64 stream.

    A keep probability that is a multiple of 1/256 (p = 0.25, 0.5, …) needs only 8 random bits
    per element, eight per 64-bit draw, which halves the cost of the draws; any other takes
    16. Drawn a chunk at a time into the result, so the raw bits never exist all at once; the
    stream, hence the mask, is the same for any ``chunk``.
    """
    bits, dtype = (8, np.uint8) if threshold % 256 == 0 else (16, np.uint16)
    limit = threshold >> (16 - bits)
    per_draw = 64 // bits
    keep = np.empty(n, dtype=bool)
    stream = np.random.PCG64(seed)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        raw = stream.random_raw(-(-(stop - start) // per_draw)).view(dtype)[: stop - start]
        np.less(raw, limit, out=keep[start:stop])
    return keep


def _apply_mask(x: Tensor, keep: Tensor, scale: float) -> Tensor:
    """``x · keep · scale``, with ``keep`` turned into numbers by numpy.

    torch converts bool to floating point with scalar code (9 ms for a [5120, 512] mask to
    bfloat16 on one core, against 0.5 ms in numpy), and ``x * keep`` converts implicitly.
    bfloat16 is multiplied by exact 0/1 first and then by the scale (computed in float32 and
    rounded once), because the scale itself (4/3 for p = 0.25) has no exact bfloat16 value.
    """
    flags = keep.numpy().view(np.uint8)
    if x.dtype == torch.bfloat16:  # 0x3F80 is 1.0 in bfloat16
        ones = np.multiply(flags, np.uint16(0x3F80), dtype=np.uint16)
        return x.mul(torch.from_numpy(ones).view(torch.bfloat16)).mul_(scale)
    if x.dtype in (torch.float32, torch.float64):
        dtype = np.float32 if x.dtype == torch.float32 else np.float64
        return x.mul(torch.from_numpy(np.multiply(flags, dtype(scale), dtype=dtype)))
    return x.mul(keep.to(x.dtype)).mul_(scale)


class _ScaleByMask(torch.autograd.Function):
    """``x · keep · scale`` saving only the boolean ``keep`` for backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, keep: Tensor, scale: float
    ) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale  # type: ignore[attr-defined]
        return _apply_mask(x, keep, scale)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, None, None]:
        (keep,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return _apply_mask(grad, keep, ctx.scale), None, None  # type: ignore[attr-defined]


class Tanh(nn.Tanh):
    """``nn.Tanh`` that evaluates a bfloat16 input in float32 (2.2× faster on CPU, where
    torch's bfloat16 tanh is not vectorised) and keeps only the bfloat16 output for backward."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.bfloat16 or x.device.type != "cpu":
            return torch.tanh(x)
        return _WideTanh.apply(x)


class _WideTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        y = torch.tanh(x.float()).to(x.dtype)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> Tensor:
        (y,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return torch.ops.aten.tanh_backward(grad, y)


class _WidePooling(torch.autograd.Function):
    """``M = A·h`` for a low-precision ``h`` (bfloat16 under autocast), in ``A``'s precision.

    ``torch.bmm(A, h.float())`` would keep a float32 copy of ``h`` alive for backward and
    return a float32 gradient of the same size (195 MiB each at 100,000 patches × 512). Here
    ``h`` is widened a chunk of rows at a time, in forward and in backward, and its gradient
    is returned in ``h``'s own dtype, as the cast's backward would round it. The products are
    those of the float32 bmm up to summation order; every row of the batch stays separate.
    """

    CHUNK: ClassVar[int] = 16384

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, attention: Tensor, h: Tensor) -> Tensor:
        ctx.save_for_backward(attention, h)
        b, k, n = attention.shape
        out = attention.new_zeros(b, k, h.shape[-1])
        with torch.autocast(device_type=h.device.type, enabled=False):
            for start in range(0, n, _WidePooling.CHUNK):
                stop = start + _WidePooling.CHUNK
                out += torch.bmm(attention[..., start:stop], h[:, start:stop].to(out.dtype))
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
        attention, h = ctx.saved_tensors  # type: ignore[attr-defined]
        need_attention, need_h = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad = grad.to(attention.dtype)
        grad_attention = torch.empty_like(attention) if need_attention else None
        grad_h = torch.empty_like(h) if need_h else None
        with torch.autocast(device_type=h.device.type, enabled=False):
            for start in range(0, attention.shape[-1], _WidePooling.CHUNK):
                stop = start + _WidePooling.CHUNK
                if grad_attention is not None:
                    rows = h[:, start:stop].to(grad.dtype).transpose(1, 2)
                    grad_attention[..., start:stop] = torch.bmm(grad, rows)
                if grad_h is not None and attention.shape[1] == 1:  # an outer product
                    weights = attention[:, 0, start:stop, None]
                    torch.mul(weights, grad, out=grad_h[:, start:stop])
                elif grad_h is not None:
                    grad_h[:, start:stop] = torch.bmm(
                        attention[..., start:stop].transpose(1, 2), grad
                    )
        return grad_attention, grad_h


class MILModel(nn.Module, ABC):
    """Shared attention-MIL body; subclasses add the slide and instance heads.

    The attention scorer ``w`` has no bias: a constant added to every score of a bag cancels in
    the softmax, so its gradient would be identically zero (a parameter Opacus cannot handle)
    and it could never change any output anyway.
    """

    kind: ClassVar[str] = ""
    has_instance_task: ClassVar[bool] = True
    """False when ``instance_logits`` are derived from the slide head rather than trained for
    (``abmil``); a trainer then passes ``None`` to the instance loss."""

    def __init__(self, cfg: ModelConfig, n_branches: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_branches = n_branches
        hidden, att = cfg.hidden_dim, cfg.attention_dim
        # Dropout before ReLU gives exactly Dropout(ReLU(W₁h)) (scaling by a positive factor
        # commutes with max(0, ·)) while autograd keeps one [N, hidden] tensor fewer: ReLU's
        # output is h' itself, instead of ReLU's output and h' both.
        self.backbone = nn.Sequential(
            _linear(cfg.feature_dim, hidden), MaskDropout(cfg.dropout), nn.ReLU()
        )
        self.attention_a = nn.Sequential(_linear(hidden, att), Tanh(), MaskDropout(cfg.dropout))
        self.attention_b: nn.Sequential | None = (
            nn.Sequential(_linear(hidden, att), nn.Sigmoid(), MaskDropout(cfg.dropout))
            if cfg.gated
            else None
        )
        self.attention_w = _linear(att, n_branches, bias=False)

    def _check_inputs(self, features: Tensor, mask: Tensor | None) -> Tensor:
        """Validate shapes and return the boolean mask (all True when ``mask`` is None)."""
        if features.dim() != 3:
            raise ValueError(f"features must be [B, N, D]; got shape {tuple(features.shape)}")
        b, n, d = features.shape
        if d != self.cfg.feature_dim:
            raise ValueError(f"features have D={d}; the model expects {self.cfg.feature_dim}")
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point; got {features.dtype}")
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=features.device)
        elif mask.shape != (b, n):
            raise ValueError(f"mask must be [B, N] = {(b, n)}; got {tuple(mask.shape)}")
        elif mask.dtype != torch.bool:
            raise ValueError(f"mask must be boolean (True = real patch); got {mask.dtype}")
        if b and not bool(mask.any(dim=1).all()):
            empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"bags {empty} have no real patch; their attention is undefined")
        return mask

    @abstractmethod
    def _slide_logits(self, embeddings: Tensor) -> Tensor:
        """``[B, K, hidden]`` slide vectors → ``[B, C]`` logits."""

    @abstractmethod
    def _instance_logits(self, h: Tensor) -> Tensor:
        """``[B, N, hidden]`` patch embeddings → ``[B, N, 2]`` logits (padding not yet zeroed)."""

    def _gate(self, h: Tensor) -> Tensor:
        """``Dropout(tanh(V h')) ⊙ Dropout(σ(U h'))``, or the first factor alone if not gated.

        Computed as ``Dropout_U(Dropout_V(tanh(V h') ⊙ σ(U h')))`` with the two masks applied
        as one: dropout is multiplication by a scaled 0/1 mask, so the value is the same (up to
        rounding) and so are the masks (same layers, shapes and order of draws), but autograd
        keeps ``tanh``, ``σ``, the product and one 1-byte mask instead of also both dropped
        copies and their masks.
        """
        if self.attention_b is None:
            return self.attention_a(h)
        linear_a, tanh, dropout_a = self.attention_a
        linear_b, sigmoid, dropout_b = self.attention_b
        return combined_dropout(tanh(linear_a(h)) * sigmoid(linear_b(h)), (dropout_a, dropout_b))

    def forward(self, features: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Run ``B`` bags of up to ``N`` patches; ``mask`` True marks real patches.

        Raises ``ValueError`` on wrong shapes or on a bag without any real patch (its softmax
        would be 0/0).
        """
        mask = self._check_inputs(features, mask)
        pad = ~mask
        # Zeroing padded features first keeps NaN/inf there from reaching anything (0·NaN = NaN
        # in the weighted sum even under zero attention). When the padding is zero already (no
        # padding, or collate's zero rows) the copy is skipped: it would be the size of the
        # whole batch, 512 MB for one bag of 100,000 patches.
        x = features
        if bool(pad.any()) and bool(features[pad].any()):
            x = features.masked_fill(pad.unsqueeze(-1), 0.0)
        h = self.backbone(x)  # [B, N, hidden]
        scores = self.attention_w(self._gate(h))  # [B, N, K]
        instance_logits = self._instance_logits(h)  # a per-patch layer like the ones above
        # Under bfloat16 autocast (a trainer option) only the per-patch layers, which hold
        # nearly all the FLOPs, run in bfloat16. The softmax over up to 100,000 patches, the
        # pooled slide vectors and the slide head stay in the model's precision: they are
        # cheap, and pooling in bfloat16 (attention weights of ~1e-4 rounded to 8 bits, the
        # slide vector rounded too) moved slide logits by ~2e-3 on a 5,000-patch bag, against
        # 3e-5 this way.
        dtype = self.attention_w.weight.dtype  # the model's own precision (float32, float64)
        with torch.autocast(device_type=features.device.type, enabled=False):
            scores = scores.to(dtype).transpose(1, 2).masked_fill(pad.unsqueeze(1), float("-inf"))
            attention = F.softmax(scores, dim=-1)  # exp(-inf) = 0 exactly at padding
            if h.dtype == dtype:
                embeddings = torch.bmm(attention, h)  # [B, K, hidden]
            else:
                embeddings = _WidePooling.apply(attention, h)
            logits = self._slide_logits(embeddings)
            instance_logits = instance_logits.to(dtype).masked_fill(pad.unsqueeze(-1), 0.0)
        return MILOutput(
            logits=logits,
            attention=attention,
            attention_scores=scores,
            instance_logits=instance_logits,
            embeddings=embeddings,
        )


class ABMIL(MILModel):
    """Gated-attention MIL (Ilse et al. 2018): one branch, a ``hidden → C`` classifier.

    It has no instance classifier, so that no parameter can go unused under Opacus. Its
    ``instance_logits`` apply the slide classifier to every patch embedding ``h'`` (``z``,
    ``[B, N, C]``) and fold the classes into tumour-vs-rest: column 1 is ``z_t`` for
    ``tumour_class`` ``t`` and column 0 is ``logsumexp`` of the other classes, so the two-way
    softmax equals the C-way probability of the tumour class (for ``C = 2`` it is ``z``
    itself). They are a readout for heatmaps, not a trained task (``has_instance_task``).
    """

    kind: ClassVar[str] = "abmil"
    has_instance_task: ClassVar[bool] = False

    def __init__(self, cfg: ModelConfig, tumour_class: int = 1) -> None:
        super().__init__(cfg, n_branches=1)
        if not 0 <= tumour_class < cfg.n_classes:
            raise ValueError(f"tumour_class {tumour_class} outside 0..{cfg.n_classes - 1}")
        self.tumour_class = tumour_class
        self.classifier = _linear(cfg.hidden_dim, cfg.n_classes)

    def _slide_logits(self, embeddings: Tensor) -> Tensor:
        return self.classifier(embeddings[:, 0])

    def _instance_logits(self, h: Tensor) -> Tensor:
        z = self.classifier(h).to(self.classifier.weight.dtype)  # [B, N, C]; float32 under autocast
        t = self.tumour_class
        rest = torch.cat([z[..., :t], z[..., t + 1 :]], dim=-1)
        return torch.stack([torch.logsumexp(rest, dim=-1), z[..., t]], dim=-1)


class CLAMSB(MILModel):
    """CLAM single branch with MS-CLAM's one shared ``hidden → 2`` instance classifier."""

    kind: ClassVar[str] = "clam_sb"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, n_branches=1)
        self.classifier = _linear(cfg.hidden_dim, cfg.n_classes)
        self.instance_classifier = _linear(cfg.hidden_dim, 2)

    def _slide_logits(self, embeddings: Tensor) -> Tensor:
        return self.classifier(embeddings[:, 0])

    def _instance_logits(self, h: Tensor) -> Tensor:
        return self.instance_classifier(h)


class CLAMMB(MILModel):
    """CLAM multi branch: branch ``c`` attends for class ``c`` and ``logit_c = W_c M_c + b_c``.

    The per-class heads are separate ``nn.Linear(hidden, 1)`` layers (as in CLAM) rather than
    one custom einsum, so Opacus computes their per-sample gradients with its stock Linear
    sampler.
    """

    kind: ClassVar[str] = "clam_mb"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, n_branches=cfg.n_classes)
        self.classifiers = nn.ModuleList(_linear(cfg.hidden_dim, 1) for _ in range(cfg.n_classes))
        self.instance_classifier = _linear(cfg.hidden_dim, 2)

    def _slide_logits(self, embeddings: Tensor) -> Tensor:
        return torch.cat(
            [head(embeddings[:, c]) for c, head in enumerate(self.classifiers)], dim=-1
        )

    def _instance_logits(self, h: Tensor) -> Tensor:
        return self.instance_classifier(h)


def build_model(cfg: ModelConfig) -> MILModel:
    """The architecture ``cfg.kind`` with ``cfg``'s sizes, freshly initialised.

    Initialisation draws from torch's global generator: call ``torch.manual_seed`` first for a
    reproducible model (server and sites only need the same config, the weights travel).
    """
    if cfg.kind == "abmil":
        return ABMIL(cfg)
    if cfg.kind == "clam_sb":
        return CLAMSB(cfg)
    if cfg.kind == "clam_mb":
        return CLAMMB(cfg)
    raise ValueError(f"unknown model kind {cfg.kind!r}")  # pragma: no cover - config validates


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters (only those with ``requires_grad`` unless told otherwise).

    Trainable is the default because that is what DP-SGD noises and what a federated round
    ships.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
