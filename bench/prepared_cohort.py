"""A cohort on disk: generated once, prepared with the real pipeline, indexed by split, with
the generator's ground truth per patch; and which outlines training may see.

Generated and prepared data are cached under ``bench/_cache/accuracy/<key>/`` (the key hashes
the cohort spec, the generator's source and the preparation settings), so reruns skip
synthesis and embedding.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch

from bench.cohorts import LABELS, ROOT, TUMOUR, CohortSpec, held_out_site, synth_config
from fedpath.client.config import AnnotationConfig, PrepareConfig
from fedpath.client.prepare.pipeline import prepare_site
from fedpath.client.training.bags import Bag, load_bag
from fedpath.client.training.site_index import BagEntry, load_site_index
from fedpath.client.wsi.annotations import patch_labels
from fedpath.common.featurebag import read_attrs
from fedpath.synthetic.slides import SynthCohortConfig, generate_cohort

CACHE = ROOT / "bench" / "_cache" / "accuracy"
NORMAL_GRADE, HIGH_GRADE, LOW_GRADE = 0, 1, 2
"""Ground-truth grade of a patch (``patch_grades``); −1: ambiguous or of mixed grade."""
MIXED_GRADE = (0.2, 0.8)
"""A tumour patch is high-grade when less than 0.2 of its tumour is low-grade, low-grade when
more than 0.8 is: in between it shows both morphologies and belongs to neither comparison."""

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    del message


@dataclass(frozen=True)
class Hospital:
    """One hospital's prepared slides by split (entries as ``prepared.csv`` lists them)."""

    name: str
    train: tuple[BagEntry, ...]
    val: tuple[BagEntry, ...]
    test: tuple[BagEntry, ...]


@dataclass(frozen=True)
class PreparedCohort:
    """The cohort on disk plus the generator's ground truth per slide.

    ``truth`` holds ground-truth patch labels (1/0/−1, feature-bag order) for every slide, from
    the tumour masks, and ``grade`` each patch's grade (``patch_grades``) from the tumour and
    low-grade masks: evaluation and the probes use them, training never does.
    """

    spec: CohortSpec
    root: Path
    hospitals: tuple[Hospital, ...]
    truth: Mapping[str, np.ndarray]
    grade: Mapping[str, np.ndarray]
    tumour_fraction: Mapping[str, float]
    feature_dim: int
    failed: tuple[str, ...] = ()
    """"slide: reason" of generated slides that preparation refused (left out)."""

    def entries(self, split: str) -> list[BagEntry]:
        """One split pooled over hospitals (the centralised case)."""
        return [e for h in self.hospitals for e in getattr(h, split)]


def _generated(hospitals_dir: Path, cfg: SynthCohortConfig, seed: int) -> bool:
    """True when ``generate_cohort`` already finished this exact cohort (it writes
    ``cohort.json`` last)."""
    marker = hospitals_dir / "cohort.json"
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text())
    return recorded == {"seed": seed, "config": cfg.model_dump(mode="json")}


def _prepare(site_dir: Path, out: Path, cfg: PrepareConfig, log: Log) -> list[str]:
    """Prepare one generator site; return "slide: reason" for each slide that failed.

    A failed slide is left out (``prepared.csv`` does not list it), as a hospital's run
    would; the caller reports it so a shrinking cohort is visible in the output.
    """
    began = time.perf_counter()
    summary = prepare_site(site_dir / "slides.csv", out, cfg)
    failed = [f"{r.slide_id}: {r.reason}" for r in summary.failed]
    log(
        f"  {site_dir.name}: {len(summary.records)} slides, "
        f"{summary.embedded_patches} patches embedded, {summary.count('skipped')} cached, "
        f"{len(failed)} failed, {time.perf_counter() - began:.0f} s"
    )
    return failed


def validation_split(
    entries: Sequence[BagEntry], share: float, seed: int
) -> tuple[list[BagEntry], list[BagEntry]]:
    """(train, val), stratified by label: ``round(share·n)`` of each label, at least one when
    a label has two or more slides (early stopping needs both classes in validation)."""
    rng = np.random.default_rng(seed)
    val_ids: set[str] = set()
    for label in sorted({e.label for e in entries}):
        ids = [e.slide_id for e in entries if e.label == label]
        count = max(1, round(share * len(ids))) if len(ids) >= 2 else 0
        val_ids.update(str(i) for i in rng.choice(ids, size=count, replace=False))
    train_part = [e for e in entries if e.slide_id not in val_ids]
    val_part = [e for e in entries if e.slide_id in val_ids]
    return train_part, val_part


def mask_patch_fraction(
    mask: np.ndarray, downsample: int, coords: np.ndarray, patch_size_level0: int
) -> np.ndarray:
    """Exact share of each patch footprint covered by a binary mask stored at ``downsample``.

    The integral image of a piecewise-constant mask is bilinear inside each cell, so its
    bilinear interpolation at fractional positions gives exact box sums for patches that are
    not aligned to the mask grid.
    """
    table = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)
    rows, cols = table.shape[0] - 1, table.shape[1] - 1

    def integral_at(v: np.ndarray, u: np.ndarray) -> np.ndarray:
        v, u = np.clip(v, 0.0, rows), np.clip(u, 0.0, cols)
        i = np.minimum(np.floor(v), rows - 1).astype(np.int64)
        j = np.minimum(np.floor(u), cols - 1).astype(np.int64)
        ty, tx = v - i, u - j
        return (
            table[i, j] * (1 - ty) * (1 - tx)
            + table[i + 1, j] * ty * (1 - tx)
            + table[i, j + 1] * (1 - ty) * tx
            + table[i + 1, j + 1] * ty * tx
        )

    xy = np.asarray(coords, dtype=np.float64)
    u0, v0 = xy[:, 0] / downsample, xy[:, 1] / downsample
    side = patch_size_level0 / downsample
    u1, v1 = u0 + side, v0 + side
    area = integral_at(v1, u1) - integral_at(v0, u1) - integral_at(v1, u0) + integral_at(v0, u0)
    return np.clip(area / (side * side), 0.0, 1.0)


def patch_grades(
    labels: np.ndarray, tumour: np.ndarray, low_grade: np.ndarray | None
) -> np.ndarray:
    """Per patch (int8): 0 normal, 1 high-grade, 2 low-grade, −1 ambiguous or mixed grade.

    ``labels`` are the ground-truth patch labels, ``tumour`` and ``low_grade`` the shares of
    each patch covered by the tumour and low-grade masks (None: no low-grade mask, all tumour
    is high-grade). A tumour patch takes a grade when that grade covers most of its tumour
    (``MIXED_GRADE``), so "weak supervision misses the low-grade part" is measured on patches
    that show only that morphology.
    """
    share = np.zeros(labels.shape, dtype=np.float64)
    if low_grade is not None:
        np.divide(low_grade, tumour, out=share, where=tumour > 0)
    grade = np.full(labels.shape, -1, dtype=np.int8)
    grade[labels == 0] = NORMAL_GRADE
    grade[(labels == 1) & (share < MIXED_GRADE[0])] = HIGH_GRADE
    grade[(labels == 1) & (share > MIXED_GRADE[1])] = LOW_GRADE
    return grade


@dataclass(frozen=True)
class SlideTruth:
    """The generator's ground truth of one prepared slide, in feature-bag order."""

    labels: np.ndarray
    grade: np.ndarray
    tumour_fraction: float
    """Realised tumour share of tissue."""


def _read_mask(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(f"cannot read mask {path}")
    return image > 127


def ground_truth(site_dir: Path, entries: Sequence[BagEntry]) -> dict[str, SlideTruth]:
    """Per slide: patch labels from the generator's tumour mask, patch grades from it and the
    low-grade mask beside it (absent: uniform high-grade tumour, or a normal slide)."""
    with (site_dir / "ground_truth.csv").open(newline="") as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    thresholds = AnnotationConfig()
    out = {}
    for entry in entries:
        row = rows[entry.slide_id]
        tumour_path = site_dir / row["tumour_mask"]
        low_grade_path = tumour_path.with_name(f"{entry.slide_id}_low_grade.png")
        downsample = int(row["mask_downsample"])
        with h5py.File(entry.features, "r") as fh:
            coords = fh["coords"][()]
        size = int(read_attrs(entry.features)["patch_size_level0"])
        tumour = mask_patch_fraction(_read_mask(tumour_path), downsample, coords, size)
        low_grade = None
        if low_grade_path.is_file():
            low_grade = mask_patch_fraction(_read_mask(low_grade_path), downsample, coords, size)
        labels = patch_labels(tumour, True, thresholds)
        out[entry.slide_id] = SlideTruth(
            labels, patch_grades(labels, tumour, low_grade), float(row["tumour_fraction"])
        )
    return out


def build_cohort(spec: CohortSpec, cache: Path = CACHE, log: Log = _quiet) -> PreparedCohort:
    """Generate (once), prepare (resumably) and index the cohort under ``cache/<key>``."""
    root = Path(cache) / spec.synth_key()
    hospitals_dir, prepared_dir = root / "hospitals", root / "prepared" / spec.prepare_key()
    synth = synth_config(spec)
    if _generated(hospitals_dir, synth, spec.seed):
        log(f"cohort {spec.synth_key()}: synthetic slides cached")
    else:
        began = time.perf_counter()
        n = sum(s.n_slides for s in synth.sites)
        log(f"cohort {spec.synth_key()}: synthesising {n} slides")
        generate_cohort(hospitals_dir, synth, spec.seed)
        log(f"  synthesised in {time.perf_counter() - began:.0f} s")
    cfg = spec.prepare_config()
    log(f"preparing with {spec.encoder} (resumes: prepared slides are skipped)")
    failed = []
    for site in synth.sites:
        failed += _prepare(hospitals_dir / site.name, prepared_dir / site.name, cfg, log)

    hospitals, truth, grade, fractions = [], {}, {}, {}
    for i, h in enumerate(spec.hospitals):
        pool = load_site_index(prepared_dir / h.name, LABELS)
        test = load_site_index(prepared_dir / held_out_site(h.name), LABELS)
        train_part, val_part = validation_split(pool, spec.val_share, spec.seed * 1000 + i)
        hospitals.append(
            Hospital(
                h.name,
                tuple(replace(e, split="train") for e in train_part),
                tuple(replace(e, split="val") for e in val_part),
                tuple(replace(e, split="test") for e in test),
            )
        )
        for site_name, entries in ((h.name, pool), (held_out_site(h.name), test)):
            for slide_id, t in ground_truth(hospitals_dir / site_name, entries).items():
                truth[slide_id], grade[slide_id] = t.labels, t.grade
                fractions[slide_id] = t.tumour_fraction
    feature_dim = int(read_attrs(hospitals[0].train[0].features)["feature_dim"])
    return PreparedCohort(
        spec, root, tuple(hospitals), truth, grade, fractions, feature_dim, tuple(failed)
    )


# ------------------------------------------------------------------ what training may see


def visible_annotations(
    cohort: PreparedCohort,
    shares: Mapping[str, float],
    seed: int,
    *,
    splits: Sequence[str] = ("train",),
) -> frozenset[str]:
    """Pool slides whose outlines training may use: per hospital and split ``round(share·n)``
    of its tumour slides in that split (``shares`` by hospital name, absent = 0), half of them
    (rounded down) partially outlined when the hospital has such slides. The training split's
    choice does not depend on whether "val" is among ``splits``."""
    visible: set[str] = set()
    for i, hospital in enumerate(cohort.hospitals):
        for split in splits:
            entries = {"train": hospital.train, "val": hospital.val}[split]
            stream = [seed, i] if split == "train" else [seed, i, 1]
            visible |= _outlined(entries, shares.get(hospital.name, 0.0), stream)
    return frozenset(visible)


def _outlined(entries: Sequence[BagEntry], share: float, stream: list[int]) -> set[str]:
    """``round(share·n)`` of the n outlined tumour slides among ``entries``, drawn from
    ``stream``: half (rounded down) partial ones when there are such, the rest complete."""
    tumour = [e for e in entries if e.label == TUMOUR and e.has_patch_labels]
    count = round(share * len(tumour))
    rng = np.random.default_rng(stream)
    partial = [e.slide_id for e in tumour if e.annotation_complete is False]
    complete = [e.slide_id for e in tumour if e.annotation_complete is True]
    n_partial = min(count // 2, len(partial))
    n_complete = min(count - n_partial, len(complete))
    n_partial = min(count - n_complete, len(partial))
    visible: set[str] = set()
    for pool, n in ((partial, n_partial), (complete, n_complete)):
        visible.update(str(s) for s in rng.choice(pool, size=n, replace=False))
    return visible


def annotated_share(
    cohort: PreparedCohort, visible: frozenset[str], split: str = "train"
) -> tuple[int, int, int]:
    """(visible outlines, of which partial, tumour slides) over the pooled ``split``."""
    tumour = [e for e in cohort.entries(split) if e.label == TUMOUR]
    shown = [e for e in tumour if e.slide_id in visible]
    partial = sum(1 for e in shown if e.annotation_complete is False)
    return len(shown), partial, len(tumour)


def _hidden(bag: Bag) -> Bag:
    """The bag as a slide-label-only slide: no patch labels, no annotation flags."""
    entry = replace(bag.entry, has_patch_labels=False, annotation_complete=None)
    return Bag(entry, bag.features, None)


def with_truth(bag: Bag, truth: np.ndarray) -> Bag:
    """The bag with ``truth`` (ground-truth 1/0/−1 per patch) as its patch labels."""
    return Bag(bag.entry, bag.features, torch.from_numpy(truth.astype(np.int8)))


@dataclass(frozen=True)
class LoadedCohort:
    """Bags in memory, ready for many training runs: train and validation bags show only the
    visible outlines (``visible_annotations``), test bags carry the ground truth (for
    evaluation only)."""

    train: tuple[Bag, ...]
    val: tuple[Bag, ...]
    test: tuple[Bag, ...]
    probe_train: tuple[Bag, ...]
    """Training-pool bags with ground truth: for the feature-space probe, never for MIL."""
    grade: Mapping[str, np.ndarray]
    """Ground-truth patch grades of the pool and test slides by slide id (``patch_grades``):
    for scoring and probing low-grade tumour, never for MIL."""


def load_cohort(cohort: PreparedCohort, visible: frozenset[str]) -> LoadedCohort:
    """Load every bag once (a few hundred MB for the full cohort) and label it per its use."""
    dim = cohort.feature_dim
    train_bags = [load_bag(e, dim) for e in cohort.entries("train")]
    val_bags = [load_bag(e, dim) for e in cohort.entries("val")]
    test_bags = [load_bag(e, dim) for e in cohort.entries("test")]
    return LoadedCohort(
        train=tuple(b if b.entry.slide_id in visible else _hidden(b) for b in train_bags),
        val=tuple(b if b.entry.slide_id in visible else _hidden(b) for b in val_bags),
        test=tuple(with_truth(b, cohort.truth[b.entry.slide_id]) for b in test_bags),
        probe_train=tuple(
            with_truth(b, cohort.truth[b.entry.slide_id]) for b in train_bags + val_bags
        ),
        grade=cohort.grade,
    )


def describe(cohort: PreparedCohort, visible: frozenset[str]) -> list[str]:
    """Config lines: slides and patches per hospital and split, outlines training sees."""
    lines = []
    for h in cohort.hospitals:
        parts = []
        for split in ("train", "val", "test"):
            entries = getattr(h, split)
            tumour = sum(1 for e in entries if e.label == TUMOUR)
            patches = sum(e.num_patches for e in entries)
            parts.append(f"{split} {len(entries)} ({tumour} tumour, {patches:,} patches)")
        lines.append(f"  {h.name}: " + ", ".join(parts))
    lines += [f"  left out (preparation failed): {f}" for f in cohort.failed]
    shown, partial, tumour = annotated_share(cohort, visible)
    fractions = [cohort.tumour_fraction[e.slide_id] for e in cohort.entries("train")]
    positive = sorted(f for f in fractions if f > 0)
    lines.append(
        f"  training outlines visible: {shown} of {tumour} tumour slides "
        f"({shown / max(tumour, 1):.0%}; {partial} partial)"
    )
    shown_val, partial_val, tumour_val = annotated_share(cohort, visible, "val")
    if shown_val:
        lines.append(
            f"  validation outlines visible: {shown_val} of {tumour_val} tumour slides "
            f"({partial_val} partial), for the mixed arms' stopping loss"
        )
    if positive:
        lines.append(
            f"  tumour share of tissue on training tumour slides: {positive[0]:.3f} .. "
            f"{positive[-1]:.3f} (median {statistics.median(positive):.3f})"
        )
    low, high = cohort.spec.low_grade_share_range
    if high > 0:
        counts = []
        for name, splits in (("pool", ("train", "val")), ("test", ("test",))):
            grades = [cohort.grade[e.slide_id] for split in splits for e in cohort.entries(split)]
            n_high = sum(int((g == HIGH_GRADE).sum()) for g in grades)
            n_low = sum(int((g == LOW_GRADE).sum()) for g in grades)
            counts.append(f"{name} {n_high:,} high-grade / {n_low:,} low-grade patches")
        lines.append(
            f"  tumour heterogeneity: {low:.0%}-{high:.0%} of each tumour low-grade; "
            + ", ".join(counts)
        )
    normal = cohort.spec.mimic_share_range
    tumour = cohort.spec.tumour_slide_mimic_share_range or normal
    if max(normal[1], tumour[1]) > 0:
        lines.append(
            f"  benign mimic of low-grade tumour (ground truth: normal): {normal[0]:.0%}-"
            f"{normal[1]:.0%} of a normal slide's tissue, {tumour[0]:.0%}-{tumour[1]:.0%} of a "
            "tumour slide's non-tumour tissue"
        )
    return lines
