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

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.mil.config import ModelConfig

__all__ = [
    "ABMIL",
    "CLAMMB",
    "CLAMSB",
    "MILModel",
    "MILOutput",
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
        self.backbone = nn.Sequential(
            _linear(cfg.feature_dim, hidden), nn.ReLU(), nn.Dropout(cfg.dropout)
        )
        self.attention_a = nn.Sequential(_linear(hidden, att), nn.Tanh(), nn.Dropout(cfg.dropout))
        self.attention_b: nn.Sequential | None = (
            nn.Sequential(_linear(hidden, att), nn.Sigmoid(), nn.Dropout(cfg.dropout))
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

    def forward(self, features: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Run ``B`` bags of up to ``N`` patches; ``mask`` True marks real patches.

        Raises ``ValueError`` on wrong shapes or on a bag without any real patch (its softmax
        would be 0/0).
        """
        mask = self._check_inputs(features, mask)
        pad = ~mask
        # Zeroing padded features first keeps NaN/inf there from reaching anything (0·NaN = NaN
        # in the weighted sum even under zero attention).
        x = features.masked_fill(pad.unsqueeze(-1), 0.0)
        h = self.backbone(x)  # [B, N, hidden]
        gate = self.attention_a(h)
        if self.attention_b is not None:
            gate = gate * self.attention_b(h)
        scores = self.attention_w(gate).transpose(1, 2)  # [B, K, N]
        scores = scores.masked_fill(pad.unsqueeze(1), float("-inf"))
        attention = F.softmax(scores, dim=-1)  # exp(-inf) = 0 exactly at padding
        embeddings = torch.bmm(attention, h)  # [B, K, hidden]
        logits = self._slide_logits(embeddings)
        instance_logits = self._instance_logits(h).masked_fill(pad.unsqueeze(-1), 0.0)
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
        z = self.classifier(h)  # [B, N, C]
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
