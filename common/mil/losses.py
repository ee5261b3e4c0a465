"""Mixed-supervision losses of attention-MIL (DESIGN §4.4, after CLAM and MS-CLAM).

Total per slide: ``c_bag·CE(logits, y) + (1 − c_bag)·L_inst + λ_att·L_att``. Every per-slide
term is computed from that slide's row only (its logits, attention row, instance logits, mask
and patch labels), because slide-level DP-SGD (§4.5) treats one slide as one sample along
dimension 0 and Opacus' per-sample gradients are only correct when no loss term mixes rows.
:func:`per_slide_losses` therefore exposes the ``[B]`` vector so the DP trainer can choose its
own reduction; :func:`mixed_supervision_loss` averages it and reports the parts.

Conventions for the model outputs (written against tensors, not against ``models.py``):
``logits [B, C]``, ``attention [B, K, N]`` (softmax over real patches, 0 at padding, ``K`` is 1
or ``C``), ``instance_logits [B, N, 2]`` (one shared tumour-vs-normal classifier) and
``mask [B, N]`` (True = real patch). With one attention branch per class (``K = C``) the branch
of ``cfg.tumour_class`` is used for instance sampling and attention regularisation: the shared
instance classifier predicts *tumour*, so it is the tumour branch whose high attention must mean
tumour (and is a false positive on a normal slide). Patch labels are 1 tumour, 0 normal,
−1 unknown; an unpadded label vector (shorter than ``N``) covers the first patches, as the
collate function pads at the end.

Slides whose label is not ``cfg.tumour_class`` are "normal" slides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fedpath.common.mil.config import SupervisionConfig

__all__ = [
    "LossBreakdown",
    "attention_loss",
    "instance_targets",
    "mixed_supervision_loss",
    "normalised_entropy",
    "per_slide_losses",
    "smooth_top1_svm",
]


def smooth_top1_svm(
    scores: Tensor, targets: Tensor, tau: float = 1.0, alpha: float = 1.0, hard_gap: float = 6.91
) -> Tensor:
    """Mean smooth top-1 SVM loss (Berrada et al. 2018) over ``M`` rows of ``C`` scores.

    ``L = τ·log Σ_j exp((α·[j≠y] + s_j − s_y)/τ)``. Rows whose augmented scores
    ``α·[j≠y] + s_j`` have a top-2 gap ``≥ hard_gap`` use the hard hinge
    ``max_j(α·[j≠y] + s_j − s_y)`` instead: there the smooth loss equals the hinge to within
    ``τ·log(1 + e^{−gap/τ})`` and the original smooth-topk code switches to avoid overflow in
    its exp-sum; here both branches stay finite (log-sum-exp with max subtraction), so huge
    scores give neither inf nor NaN, values nor gradients.
    """
    if scores.dim() != 2 or targets.dim() != 1 or targets.shape[0] != scores.shape[0]:
        raise ValueError(
            f"scores must be [M, C] and targets [M]; got {tuple(scores.shape)}, "
            f"{tuple(targets.shape)}"
        )
    if tau <= 0 or alpha <= 0 or hard_gap <= 0:
        raise ValueError("tau, alpha and hard_gap must be positive")
    if scores.shape[0] == 0:
        return scores.sum() * 0.0
    n_classes = scores.shape[1]
    if n_classes < 2:
        raise ValueError("smooth_top1_svm needs at least two classes")
    targets = targets.long()
    if bool(((targets < 0) | (targets >= n_classes)).any()):
        raise ValueError(f"targets must lie in [0, {n_classes})")
    margin = alpha * (1.0 - F.one_hot(targets, n_classes).to(scores.dtype))
    augmented = scores + margin
    true_score = scores.gather(1, targets[:, None])
    shifted = augmented - true_score  # the j = y entry is exactly 0
    smooth = tau * torch.logsumexp(shifted / tau, dim=1)
    hard = shifted.max(dim=1).values
    top2 = augmented.detach().topk(2, dim=1).values
    use_hard = (top2[:, 0] - top2[:, 1]) >= hard_gap
    return torch.where(use_hard, hard, smooth).mean()


def normalised_entropy(x: Tensor) -> Tensor:
    """``H̃(x) = −Σ xᵢ log xᵢ / log|x|`` of a probability vector, in [0, 1].

    Safe where an entry is 0 (``0·log 0 = 0``, with a finite gradient) and for ``|x| = 1``,
    where the ratio is 0/0: a single patch carries no spread to reward or penalise, so the
    value is 0 (still connected to the graph so callers may always backpropagate).
    """
    if x.dim() != 1:
        raise ValueError(f"normalised_entropy expects a vector; got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n <= 1:
        return x.sum() * 0.0
    tiny = torch.finfo(x.dtype).tiny
    entropy = -(x * torch.log(x.clamp_min(tiny))).sum()
    return entropy / math.log(n)


def _labels_row(patch_labels: Tensor | None, n: int) -> Tensor | None:
    """Patch labels padded with −1 (unknown) to the bag's padded length ``n``."""
    if patch_labels is None:
        return None
    labels = patch_labels.reshape(-1).long()
    if labels.shape[0] > n:
        raise ValueError(f"{labels.shape[0]} patch labels for a bag of {n} patches")
    if labels.shape[0] < n:
        labels = torch.cat([labels, labels.new_full((n - labels.shape[0],), -1)])
    return labels


def _check_row(attention_row: Tensor, mask_row: Tensor) -> None:
    if attention_row.dim() != 1 or mask_row.shape != attention_row.shape:
        raise ValueError(
            f"attention_row and mask_row must be [N] vectors of one length; got "
            f"{tuple(attention_row.shape)}, {tuple(mask_row.shape)}"
        )
    if not bool(mask_row.any()):
        raise ValueError("a bag without real patches has no loss")


def _is_annotated_tumour(
    labels: Tensor | None, slide_label: int, mask_row: Tensor, cfg: SupervisionConfig
) -> bool:
    """Mixed mode, tumour slide, and at least one real patch labelled tumour.

    A tumour slide whose labels mark no tumour patch (e.g. all unknown) gives no positives to
    learn from, so it is treated like an unannotated slide.
    """
    if cfg.mode != "mixed" or labels is None or slide_label != cfg.tumour_class:
        return False
    return bool(((labels == 1) & mask_row).any())


def _pick(
    candidates: Tensor, count: int, scores: Tensor, generator: torch.Generator | None
) -> Tensor:
    """``count`` of the candidate indices: highest score, or uniformly at random if seeded."""
    if count >= candidates.shape[0]:
        chosen = candidates
    elif generator is not None:
        perm = torch.randperm(candidates.shape[0], generator=generator)
        chosen = candidates[perm[:count]]
    else:
        order = scores[candidates].topk(count).indices
        chosen = candidates[order]
    return chosen


def instance_targets(
    attention_row: Tensor,
    patch_labels: Tensor | None,
    slide_label: int,
    annotation_complete: bool | None,
    mask_row: Tensor,
    cfg: SupervisionConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Patch indices and 0/1 targets of one slide's instance task (DESIGN §4.4).

    - Mixed mode, tumour slide with tumour-labelled patches: positives are up to
      ``cfg.annotated_positives`` (B_gt) patches labelled 1; negatives are ``ceil(P/2)`` patches
      labelled 0 (P = positives taken) but only when ``annotation_complete`` is True, because
      elsewhere an unlabelled patch may be unoutlined tumour. Without a ``generator`` the
      patches with the highest attention are taken (deterministic; for negatives these are the
      hard ones); with a ``generator`` they are drawn uniformly, reproducibly for its seed.
    - Tumour slide otherwise (or weak mode): the top-B attention patches → 1 and the
      bottom-``ceil(B/2)`` → 0, B = ``cfg.attention_k`` clipped to the real patches; the bottom
      set is further clipped so it never overlaps the top set.
    - Normal slide: its top-B attention patches → 0.

    Padding is never selected. Selection uses the detached attention: it chooses which
    patches are supervised, it is not itself differentiated.
    """
    _check_row(attention_row, mask_row)
    mask_row = mask_row.bool()
    n = attention_row.shape[0]
    labels = _labels_row(patch_labels, n)
    att = attention_row.detach()
    real = mask_row.nonzero().flatten()
    n_real = int(real.shape[0])
    device = attention_row.device

    if _is_annotated_tumour(labels, slide_label, mask_row, cfg):
        assert labels is not None  # narrowed by _is_annotated_tumour
        tumour = ((labels == 1) & mask_row).nonzero().flatten()
        pos = _pick(tumour, cfg.annotated_positives, att, generator)
        neg = pos.new_zeros((0,))
        if annotation_complete:
            normal = ((labels == 0) & mask_row).nonzero().flatten()
            neg = _pick(normal, (pos.shape[0] + 1) // 2, att, generator)
        idx = torch.cat([pos, neg])
        targets = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
        return idx.to(device), targets.to(device)

    k_top = min(cfg.attention_k, n_real)
    top = att.masked_fill(~mask_row, -math.inf).topk(k_top).indices
    if slide_label != cfg.tumour_class:
        return top, torch.zeros_like(top)
    k_bottom = min((cfg.attention_k + 1) // 2, n_real - k_top)
    bottom = att.masked_fill(~mask_row, math.inf).topk(k_bottom, largest=False).indices
    idx = torch.cat([top, bottom])
    targets = torch.cat([torch.ones_like(top), torch.zeros_like(bottom)])
    return idx, targets


def attention_loss(
    attention_row: Tensor,
    patch_labels: Tensor | None,
    slide_label: int,
    mask_row: Tensor,
    cfg: SupervisionConfig,
) -> Tensor:
    """Attention regularisation of one slide (MS-CLAM; DESIGN §4.4); 0 in weak mode.

    - Normal slide: ``−H̃(A)`` over the real patches — no patch of a normal slide deserves
      focus, so spread attention is rewarded.
    - Annotated tumour slide (mixed mode, at least one real patch labelled 1):
      ``Σ_{label 0} A − Σ_{label 1} A − H̃(A_tumour / Σ A_tumour)``: move attention mass onto the
      outlined tumour and spread it over all of it rather than one patch. Label-0 patches exist
      only under complete annotation (partial outlines leave the rest at −1), so the first term
      is naturally absent otherwise.
    - Otherwise 0 (a constant connected to the graph).
    """
    _check_row(attention_row, mask_row)
    mask_row = mask_row.bool()
    zero = attention_row.sum() * 0.0
    if cfg.mode == "weak":
        return zero
    labels = _labels_row(patch_labels, attention_row.shape[0])
    if slide_label != cfg.tumour_class:
        return zero - normalised_entropy(attention_row[mask_row])
    if not _is_annotated_tumour(labels, slide_label, mask_row, cfg):
        return zero
    assert labels is not None  # narrowed by _is_annotated_tumour
    tumour = (labels == 1) & mask_row
    normal = (labels == 0) & mask_row
    a_tumour = attention_row[tumour]
    mass = a_tumour.sum()
    spread = normalised_entropy(a_tumour / mass.clamp_min(torch.finfo(mass.dtype).tiny))
    return zero + attention_row[normal].sum() - mass - spread


@dataclass(frozen=True)
class LossBreakdown:
    """The averaged total and its parts (each a mean over the B slides), plus counts.

    ``per_slide`` is the ``[B]`` vector the total averages, for DP reductions and logging.
    Counts are over the whole batch: sampled positive and negative instances, and slides that
    received patch-level (annotated) supervision.
    """

    total: Tensor
    bag: Tensor
    instance: Tensor
    attention: Tensor
    per_slide: Tensor
    n_positive: int
    n_negative: int
    n_annotated: int


def _attention_rows(attention: Tensor, n_classes: int, cfg: SupervisionConfig) -> Tensor:
    """``[B, N]`` attention of the branch used for supervision (see module docstring)."""
    if attention.dim() != 3:
        raise ValueError(f"attention must be [B, K, N]; got {tuple(attention.shape)}")
    k = attention.shape[1]
    if k == 1:
        return attention[:, 0]
    if k != n_classes:
        raise ValueError(f"attention has {k} branches; expected 1 or {n_classes}")
    if cfg.tumour_class >= k:
        raise ValueError(f"tumour_class {cfg.tumour_class} has no attention branch")
    return attention[:, cfg.tumour_class]


def _per_slide_parts(
    logits: Tensor,
    attention: Tensor,
    instance_logits: Tensor | None,
    slide_labels: Tensor,
    patch_labels: list[Tensor | None] | tuple[Tensor | None, ...],
    annotation_complete: list[bool | None] | tuple[bool | None, ...],
    mask: Tensor,
    cfg: SupervisionConfig,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int, int]:
    """Per-slide total, bag, instance and attention terms ``[B]`` each, plus counts."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C]; got {tuple(logits.shape)}")
    b, n_classes = logits.shape
    rows = _attention_rows(attention, n_classes, cfg)
    if rows.shape[0] != b or mask.shape != rows.shape:
        raise ValueError(
            f"batch shapes disagree: logits {tuple(logits.shape)}, attention "
            f"{tuple(attention.shape)}, mask {tuple(mask.shape)}"
        )
    if slide_labels.shape != (b,) or len(patch_labels) != b or len(annotation_complete) != b:
        raise ValueError("slide_labels, patch_labels and annotation_complete need one per slide")
    if instance_logits is not None and instance_logits.shape[:2] != rows.shape:
        raise ValueError(f"instance_logits must be [B, N, 2]; got {tuple(instance_logits.shape)}")
    if cfg.mode == "weak":  # CLAM: patch labels are ignored entirely
        patch_labels = [None] * b

    bag = F.cross_entropy(logits, slide_labels.long(), reduction="none")
    instance_terms: list[Tensor] = []
    attention_terms: list[Tensor] = []
    n_pos = n_neg = n_annotated = 0
    for i in range(b):
        y = int(slide_labels[i])
        row, mask_row = rows[i], mask[i].bool()
        labels = _labels_row(patch_labels[i], row.shape[0])
        if _is_annotated_tumour(labels, y, mask_row, cfg):
            n_annotated += 1
        attention_terms.append(attention_loss(row, labels, y, mask_row, cfg))
        if instance_logits is None:
            continue
        idx, targets = instance_targets(
            row, labels, y, annotation_complete[i], mask_row, cfg, generator
        )
        n_pos += int(targets.sum())
        n_neg += int(targets.shape[0] - targets.sum())
        scores = instance_logits[i, idx.to(instance_logits.device)]
        targets = targets.to(instance_logits.device)
        if cfg.instance_loss == "svm":
            term = smooth_top1_svm(scores, targets, cfg.svm_tau, cfg.svm_alpha, cfg.svm_hard_gap)
        else:
            term = F.cross_entropy(scores, targets) if targets.numel() else scores.sum() * 0.0
        instance_terms.append(term)

    att = torch.stack(attention_terms)
    if instance_logits is None:  # e.g. abmil: no instance task, the bag term gets full weight
        inst = torch.zeros_like(bag)
        total = bag + cfg.attention_weight * att
    else:
        inst = torch.stack(instance_terms)
        total = cfg.bag_weight * bag + (1.0 - cfg.bag_weight) * inst + cfg.attention_weight * att
    return total, bag, inst, att, n_pos, n_neg, n_annotated


def per_slide_losses(
    logits: Tensor,
    attention: Tensor,
    instance_logits: Tensor | None,
    slide_labels: Tensor,
    patch_labels: list[Tensor | None] | tuple[Tensor | None, ...],
    annotation_complete: list[bool | None] | tuple[bool | None, ...],
    mask: Tensor,
    cfg: SupervisionConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``[B]`` total loss per slide; entry b depends on row b of every input only.

    ``instance_logits=None`` (a model without an instance task) drops L_inst and gives the bag
    term weight 1. ``generator`` is passed to :func:`instance_targets`.
    """
    return _per_slide_parts(
        logits,
        attention,
        instance_logits,
        slide_labels,
        patch_labels,
        annotation_complete,
        mask,
        cfg,
        generator,
    )[0]


def mixed_supervision_loss(
    logits: Tensor,
    attention: Tensor,
    instance_logits: Tensor | None,
    slide_labels: Tensor,
    patch_labels: list[Tensor | None] | tuple[Tensor | None, ...],
    annotation_complete: list[bool | None] | tuple[bool | None, ...],
    mask: Tensor,
    cfg: SupervisionConfig,
    generator: torch.Generator | None = None,
) -> LossBreakdown:
    """``c_bag·CE + (1 − c_bag)·L_inst + λ_att·L_att`` averaged over the B slides.

    ``weak`` mode is CLAM: patch labels are ignored and the attention term is 0.
    """
    total, bag, inst, att, n_pos, n_neg, n_annotated = _per_slide_parts(
        logits,
        attention,
        instance_logits,
        slide_labels,
        patch_labels,
        annotation_complete,
        mask,
        cfg,
        generator,
    )
    return LossBreakdown(
        total=total.mean(),
        bag=bag.mean(),
        instance=inst.mean(),
        attention=att.mean(),
        per_slide=total,
        n_positive=n_pos,
        n_negative=n_neg,
        n_annotated=n_annotated,
    )
