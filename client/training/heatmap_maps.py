"""What a trained MIL model says about each patch of one slide: the numbers a heatmap paints.

Attention is given as *percentiles within the slide* (rank / N): raw attention sums to 1
over a slide, so a 300-patch biopsy and a 30,000-patch resection would have incomparable
scales. Ranks put every slide on the same 0-1 colour scale (the top tenth of a slide is always
the same colour), at the price of showing relative, not absolute, focus. Drawing them is
:mod:`~fedpath.client.training.heatmap_render`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedpath.client.training.bags import Bag
from fedpath.client.training.placement import model_device
from fedpath.client.training.trainer import out_of_memory_as_error
from fedpath.common.mil.models import MILModel

__all__ = ["SlideMaps", "attention_percentiles", "slide_maps", "top_k_indices"]


@dataclass(frozen=True)
class SlideMaps:
    """One slide's model outputs, per real patch, in the bag's patch order."""

    probs: np.ndarray
    """``[C]`` softmax of the slide logits."""
    attention: np.ndarray
    """``[N]`` attention of the branch shown (the predicted class's for ``clam_mb``)."""
    branch: int
    n_branches: int
    percentile: np.ndarray
    """``[N]`` attention rank / N in (0, 1]; ties share their mean rank."""
    tumour_prob: np.ndarray
    """``[N]`` softmax of the instance logits, tumour column."""
    instance_trained: bool
    """False for ``abmil``, whose instance probabilities are a readout of the slide head."""

    @property
    def pred(self) -> int:
        return int(np.argmax(self.probs))


def attention_percentiles(attention: np.ndarray) -> np.ndarray:
    """Within-slide rank / N of each value, in (0, 1]: the largest is 1, ties share a rank."""
    values = np.asarray(attention, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"attention must be a non-empty 1-D array, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("attention contains NaN or infinite values")
    n = values.size
    ranks = np.empty(n, dtype=np.float64)
    ranks[np.argsort(values, kind="stable")] = np.arange(1, n + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    mean_rank = np.bincount(inverse, weights=ranks) / counts
    return mean_rank[inverse] / n


def top_k_indices(attention: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` most attended patches, most attended first (stable on ties)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    order = np.argsort(-np.asarray(attention, dtype=np.float64), kind="stable")
    return order[: min(k, order.size)]


def slide_maps(model: MILModel, bag: Bag) -> SlideMaps:
    """Score one bag in eval mode without gradients and keep every per-patch output."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        with out_of_memory_as_error(device, "scoring the slide"), torch.no_grad():
            out = model(bag.features.unsqueeze(0).to(device), None)
    finally:
        model.train(was_training)
    # Widened on the CPU (MPS has no float64): a slide's outputs are small.
    probs = torch.softmax(out.logits[0].cpu().double(), dim=-1).numpy()
    pred = int(np.argmax(probs))
    branch = pred if out.attention.shape[1] > 1 else 0
    attention = out.attention[0, branch].cpu().double().numpy()
    tumour = torch.softmax(out.instance_logits[0].cpu().double(), dim=-1)[:, 1].numpy()
    return SlideMaps(
        probs=probs,
        attention=attention,
        branch=branch,
        n_branches=int(out.attention.shape[1]),
        percentile=attention_percentiles(attention),
        tumour_prob=tumour,
        instance_trained=bool(model.has_instance_task),
    )
