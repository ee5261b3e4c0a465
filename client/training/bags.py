"""Feature bags as tensors: one slide loaded at a time, batches padded with a mask.

A bag of 100,000 patches × 1,280 float32 features is 512 MB, so bags are never cached in
memory as a dataset: each step loads the slides it needs (HDF5 reads are fast, ~1 GB/s from
page cache) and ``torch.from_numpy`` shares the buffer instead of copying it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from client.training.site_index import BagEntry
from common.errors import FeatureBagError
from common.featurebag import read_feature_bag


@dataclass(frozen=True)
class Bag:
    """One slide in memory: features [N, D] and, when annotated, patch labels [N] (1/0/−1)."""

    entry: BagEntry
    features: torch.Tensor
    patch_labels: torch.Tensor | None

    @property
    def num_patches(self) -> int:
        return int(self.features.shape[0])


@dataclass(frozen=True)
class BagBatch:
    """B bags padded to the longest: features [B, N, D], mask [B, N] (True = real patch)."""

    features: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    patch_labels: tuple[torch.Tensor | None, ...]
    annotation_complete: tuple[bool | None, ...]
    slide_ids: tuple[str, ...]


def load_bag(entry: BagEntry, feature_dim: int | None = None) -> Bag:
    """Read one feature bag; refuse a width that does not match the model, or features from
    other encoder weights than the site's (same width, incomparable features)."""
    bag = read_feature_bag(entry.features)
    if feature_dim is not None and bag.feature_dim != feature_dim:
        raise FeatureBagError(
            str(entry.features),
            f"has {bag.feature_dim}-d features but the model expects {feature_dim}-d "
            "(prepared with a different encoder?)",
        )
    if bag.num_patches == 0:
        raise FeatureBagError(str(entry.features), "has no patches")
    found = bag.attrs.get("encoder_sha256")
    if entry.encoder_sha256 is not None and found is not None and found != entry.encoder_sha256:
        raise FeatureBagError(
            str(entry.features),
            f"was embedded with encoder weights sha256 {str(found)[:12]}… but the site was "
            f"prepared with {entry.encoder_sha256[:12]}… (site.json): a file from another "
            "preparation; run `fedpath prepare` again for this slide",
        )
    features = torch.from_numpy(np.ascontiguousarray(bag.features, dtype=np.float32))
    labels = None
    if bag.patch_labels is not None:
        labels = torch.from_numpy(np.asarray(bag.patch_labels, dtype=np.int8))
    return Bag(entry, features, labels)


def bucket_length(n: int) -> int:
    """``n`` rounded up to one of 16 lengths per octave (at most 6.25 % more rows).

    oneDNN, which runs bfloat16 matrix products on CPU, compiles a kernel for every new
    matrix shape (about 5 ms each, 11 per slide length in a training step) and keeps only the
    last 1,024: with every slide of a cohort a different length, each step would compile
    again. Rounding lengths to a few buckets lets every step after the first few reuse them.
    """
    if n <= 16:
        return max(n, 0)
    step = 1 << (n.bit_length() - 5)
    return -(-n // step) * step


def collate(
    bags: Sequence[Bag], dtype: torch.dtype = torch.float32, bucket: bool = False
) -> BagBatch:
    """Pad bags of different lengths into one batch; slide i is row i everywhere (DP unit).

    One float32 bag without ``bucket`` is returned as a view (no copy: a 100,000-patch bag is
    512 MB). Otherwise the batch is built in one pass straight in ``dtype`` (e.g. bfloat16:
    the cast autocast would make anyway, so padding costs no extra copy), padded with zero
    rows to the longest bag, or to its :func:`bucket_length` when ``bucket`` is set.
    """
    if not bags:
        raise ValueError("cannot collate an empty list of bags")
    longest = max(b.num_patches for b in bags)
    dim = bags[0].features.shape[1]
    if any(b.features.shape[1] != dim for b in bags):
        raise ValueError("bags in one batch must have the same feature width")
    length = bucket_length(longest) if bucket else longest
    if len(bags) == 1 and length == longest and bags[0].features.dtype == dtype:
        features = bags[0].features.unsqueeze(0)
        mask = torch.ones(1, longest, dtype=torch.bool)
    else:
        features = torch.empty(len(bags), length, dim, dtype=dtype)
        mask = torch.zeros(len(bags), length, dtype=torch.bool)
        for i, bag in enumerate(bags):
            features[i, : bag.num_patches] = bag.features
            features[i, bag.num_patches :] = 0
            mask[i, : bag.num_patches] = True
    return BagBatch(
        features=features,
        mask=mask,
        labels=torch.tensor([b.entry.label for b in bags], dtype=torch.long),
        patch_labels=tuple(b.patch_labels for b in bags),
        annotation_complete=tuple(b.entry.annotation_complete for b in bags),
        slide_ids=tuple(b.entry.slide_id for b in bags),
    )
