"""Feature bags as tensors: one slide loaded at a time, batches padded with a mask.

A bag of 100,000 patches × 1,280 float32 features is 512 MB, so bags are never held in
memory as a dataset: each step loads the slides it needs (HDF5 reads are fast, ~1 GB/s from
page cache) and ``torch.from_numpy`` shares the buffer instead of copying it. Only the
resident worker keeps a run's bags between its messages, up to a byte cap
(:mod:`fedpath.client.training.bag_cache`).

One bad feature file (NaN features, another encoder, a truncated copy) costs only its slide:
the tolerant loaders below skip it and tell the caller through ``on_skip``, so a federated
round or a local run goes on with the other slides; library code never prints the reason, the
CLI or the ClientApp's log does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedpath.client.training.bag_cache import BagContent, FileIdentity, active_cache
from fedpath.client.training.site_index import BagEntry
from fedpath.common.errors import ConfigError, FeatureBagError
from fedpath.common.featurebag import read_feature_bag


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


@dataclass(frozen=True)
class SkippedBag:
    """A slide left out because its feature file cannot be used."""

    entry: BagEntry
    error: FeatureBagError
    """Names the file and the problem."""

    @property
    def message(self) -> str:
        return f"slide {self.entry.slide_id} skipped: {self.error}"


OnSkip = Callable[[SkippedBag], None]

_log = logging.getLogger("fedpath.bags")


def log_skipped(skipped: SkippedBag) -> None:
    """The default ``on_skip``: a warning on the ``fedpath.bags`` logger.

    With no logging configured (a ClientApp or resident worker process) Python writes
    warnings to stderr, which is the SuperNode's log on the hospital's machine: the file name
    is a slide id, so the reason is kept there and never put into a reply.
    """
    _log.warning("fedpath: %s", skipped.message)


def iter_usable_bags(
    entries: Sequence[BagEntry], feature_dim: int | None, on_skip: OnSkip | None = None
) -> Iterator[Bag]:
    """Load ``entries`` one at a time, skipping (and reporting) those that cannot be used.

    A generator, so a caller that only needs to know which slides load keeps one bag in
    memory at a time.
    """
    report = on_skip if on_skip is not None else log_skipped
    for entry in entries:
        try:
            bag = load_bag(entry, feature_dim)
        except FeatureBagError as error:
            report(SkippedBag(entry, error))
            continue
        yield bag


class BagSkips:
    """An ``on_skip`` that remembers what it was told (for the count a reply or a run record
    carries) and passes each skip on to the caller's sink (default: the log)."""

    def __init__(self, on_skip: OnSkip | None) -> None:
        self._forward = on_skip if on_skip is not None else log_skipped
        self.skipped: list[SkippedBag] = []

    def __call__(self, skipped: SkippedBag) -> None:
        self.skipped.append(skipped)
        self._forward(skipped)

    def bags(self, split: str, entries: Sequence[BagEntry], feature_dim: int | None) -> list[Bag]:
        """The split's usable bags, all in memory (what the trainers take)."""
        bags = list(iter_usable_bags(entries, feature_dim, self))
        self._require_one(split, entries, len(bags))
        return bags

    def entries(
        self, split: str, entries: Sequence[BagEntry], feature_dim: int | None
    ) -> list[BagEntry]:
        """The split's usable entries, for a caller that must know the count before scoring.

        Each bag is read here once more than the scorer reads it; a scorer that can count
        afterwards takes :meth:`iter_bags` instead (one read per bag).
        """
        usable = [bag.entry for bag in iter_usable_bags(entries, feature_dim, self)]
        self._require_one(split, entries, len(usable))
        return usable

    def iter_bags(
        self, split: str, entries: Sequence[BagEntry], feature_dim: int | None
    ) -> Iterator[Bag]:
        """The split's usable bags one at a time: each file is read once and memory stays at
        one bag; after the last entry, ``ConfigError`` if the split had slides but none loaded.
        """
        usable = 0
        for bag in iter_usable_bags(entries, feature_dim, self):
            usable += 1
            yield bag
        self._require_one(split, entries, usable)

    def _require_one(self, split: str, entries: Sequence[BagEntry], usable: int) -> None:
        """Refuse a split that has slides but none usable: a round on nothing is no round."""
        if entries and not usable:
            first = next(s for s in self.skipped if s.entry in entries)
            raise ConfigError(
                f"the {split} split has no usable slide: all {len(entries)} feature file(s) "
                f"were skipped, e.g. {first.error}"
            )


def load_bag(entry: BagEntry, feature_dim: int | None = None) -> Bag:
    """Read one feature bag; refuse a width that does not match the model, or features from
    other encoder weights than the site's (same width, incomparable features).

    Inside :func:`fedpath.client.training.bag_cache.use_bag_cache` (the resident worker) the file's
    content may come from the cache; the checks against ``entry`` and ``feature_dim`` run
    either way, so a hit refuses exactly what a read would.
    """
    if not entry.features.is_file():
        raise FeatureBagError(
            str(entry.features),
            "is missing, though prepared.csv lists it; run `fedpath prepare` again",
        )
    content = _bag_content(entry.features)
    num_patches, width = content.features.shape
    if feature_dim is not None and width != feature_dim:
        raise FeatureBagError(
            str(entry.features),
            f"has {width}-d features but the model expects {feature_dim}-d "
            "(prepared with a different encoder?)",
        )
    if num_patches == 0:
        raise FeatureBagError(str(entry.features), "has no patches")
    found = content.encoder_sha256
    if entry.encoder_sha256 is not None and found is not None and found != entry.encoder_sha256:
        raise FeatureBagError(
            str(entry.features),
            f"was embedded with encoder weights sha256 {found[:12]}… but the site was "
            f"prepared with {entry.encoder_sha256[:12]}… (site.json): a file from another "
            "preparation; run `fedpath prepare` again for this slide",
        )
    return Bag(entry, content.features, content.patch_labels)


def _read_content(path: Path) -> BagContent:
    """Read and validate one file (N×D, finite: :func:`fedpath.common.featurebag.validate_bag`)."""
    bag = read_feature_bag(path)
    features = torch.from_numpy(np.ascontiguousarray(bag.features, dtype=np.float32))
    labels = None
    if bag.patch_labels is not None:
        labels = torch.from_numpy(np.asarray(bag.patch_labels, dtype=np.int8))
    found = bag.attrs.get("encoder_sha256")
    return BagContent(features, labels, None if found is None else str(found))


def _bag_content(path: Path) -> BagContent:
    """The file's content, from the active cache when it holds this very version of it.

    The identity is taken before and after the read and the content is cached only when both
    agree, so a file rewritten during the read is never kept under the old identity.
    """
    cache = active_cache()
    if cache is None:
        return _read_content(path)
    try:
        before = FileIdentity.of(path)
    except OSError:
        return _read_content(path)  # reports the problem as a read would
    cached = cache.get(before)
    if cached is not None:
        return cached
    content = _read_content(path)
    with contextlib.suppress(OSError):
        if FileIdentity.of(path) == before:
            cache.put(before, content)
    return content


def sample_patches(bag: Bag, max_patches: int | None, generator: torch.Generator) -> Bag:
    """``bag`` with a random ``max_patches`` of its patches (all of them when it has no more).

    Training on a fresh random subset of each large slide every epoch, as STAMP does, costs a
    fraction of the per-patch compute that dominates an epoch, and acts as augmentation;
    evaluation always sees every patch. Patch labels are subset with the features, and the
    kept patches stay in slide order. A slide's share of tumour patches is kept in
    expectation, but a tumour of only a few patches can be left out of a step: ``None``
    trains on every patch.
    """
    n = bag.num_patches
    if max_patches is None or n <= max_patches:
        return bag
    keep = torch.randperm(n, generator=generator)[:max_patches].sort().values
    labels = None if bag.patch_labels is None else bag.patch_labels[keep]
    return Bag(entry=bag.entry, features=bag.features[keep], patch_labels=labels)


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
    bags: Sequence[Bag],
    dtype: torch.dtype = torch.float32,
    bucket: bool = False,
    pin_memory: bool = False,
) -> BagBatch:
    """Pad bags of different lengths into one batch; slide i is row i everywhere (DP unit).

    One float32 bag without ``bucket`` is returned as a view (no copy: a 100,000-patch bag is
    512 MB). Otherwise the batch is built in one pass straight in ``dtype`` (e.g. bfloat16:
    the cast autocast would make anyway, so padding costs no extra copy), padded with zero
    rows to the longest bag, or to its :func:`bucket_length` when ``bucket`` is set.

    ``pin_memory`` (a batch bound for a CUDA GPU) allocates that new buffer in page-locked
    memory, so its copy to the GPU runs at full bus speed and asynchronously; it costs nothing
    extra since the buffer is written anyway. The view of a lone float32 bag stays unpinned:
    pinning it would add a host copy of the whole bag to save part of one.
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
        features = torch.empty(len(bags), length, dim, dtype=dtype, pin_memory=pin_memory)
        mask = torch.zeros(len(bags), length, dtype=torch.bool, pin_memory=pin_memory)
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
