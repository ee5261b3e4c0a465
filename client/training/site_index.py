"""The prepared site as a training set: which bags exist, their labels, splits and patients.

Training reads ``prepared.csv`` (written by ``fedpath prepare``) rather than globbing feature
files, so a slide that failed preparation, or a stray file, can never slip into training, and
the label vocabulary is checked against the one the run expects.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np

from fedpath.client.prepare.records import INDEX_FILE, SITE_FILE
from fedpath.client.site_facts import read_site
from fedpath.common.errors import ConfigError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class BagEntry:
    """One prepared slide, as training sees it (no pixels, no features: those load lazily)."""

    slide_id: str
    label: int
    features: Path
    split: str | None
    patient_id: str | None
    has_patch_labels: bool
    annotation_complete: bool | None
    num_patches: int
    encoder_sha256: str | None = None
    """The encoder weights the site was prepared with (``site.json``); every bag must match,
    since the harmonisation gate compares only ``site.json`` across sites."""


def _bool(text: str) -> bool | None:
    return {"true": True, "false": False}.get(text.strip().lower())


def _site_encoder_sha256(root: Path) -> str | None:
    """The encoder hash ``site.json`` records, when the site has one (bare indexes in tests
    and imported CLAM folders have none, and then bags are not compared)."""
    if not (root / SITE_FILE).is_file():
        return None
    value = read_site(root).get("encoder_sha256")
    return value if isinstance(value, str) and value else None


def _stays_inside(relative: str) -> bool:
    """True for a relative path without ``..``: a tampered index must not make training read
    files elsewhere. Checked lexically, so a features folder symlinked to another disk works."""
    parts = PurePath(relative).parts
    return not PurePath(relative).is_absolute() and ".." not in parts


def load_site_index(data_dir: str | Path, labels: Sequence[str]) -> list[BagEntry]:
    """Read a prepared site's index; raise ``ConfigError`` naming the file and line on problems.

    A feature file that is missing is not an index problem: its slide is skipped when the bags
    load (:func:`client.training.bags.iter_usable_bags`), like any other unusable bag. Dropping
    it here would shift the k-fold split of every other slide.
    """
    root = Path(data_dir)
    path = root / INDEX_FILE
    if not path.is_file():
        raise ConfigError(f"{root} is not a prepared site: {INDEX_FILE} is missing (run prepare)")
    encoder_sha256 = _site_encoder_sha256(root)
    label_index = {name: i for i, name in enumerate(labels)}
    entries: list[BagEntry] = []
    problems: list[str] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            label = label_index.get(row.get("label", ""))
            relative = row.get("features") or ""
            features = root / relative
            if label is None:
                problems.append(f"line {line}: label {row.get('label')!r} not in {list(labels)}")
                continue
            if not _stays_inside(relative):
                problems.append(f"line {line}: feature path {relative!r} leaves {root}")
                continue
            split = row.get("split") or None
            if split is not None and split not in SPLITS:
                problems.append(f"line {line}: unknown split {split!r}")
                continue
            raw_patches = row.get("num_patches") or "0"
            if not (raw_patches.isascii() and raw_patches.isdigit()):
                problems.append(f"line {line}: num_patches {raw_patches!r} is not a count")
                continue
            entries.append(
                BagEntry(
                    slide_id=row["slide_id"],
                    label=label,
                    features=features,
                    split=split,
                    patient_id=row.get("patient_id") or None,
                    has_patch_labels=_bool(row.get("has_patch_labels", "")) is True,
                    annotation_complete=_bool(row.get("annotation_complete", "")),
                    num_patches=int(raw_patches),
                    encoder_sha256=encoder_sha256,
                )
            )
    if problems:
        raise ConfigError(f"{path}:\n" + "\n".join(f"  - {p}" for p in problems))
    if not entries:
        raise ConfigError(f"{path} lists no usable slides")
    return entries


def kfold_assignment(entries: Sequence[BagEntry], k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) per entry: stratified by label, patients never split across folds.

    Slides of one patient share tissue, stain and scanner; letting them straddle train and test
    inflates every metric, so folds are grouped by ``patient_id`` when the manifest gives one.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    labels = np.array([e.label for e in entries])
    smallest = int(np.bincount(labels).min()) if len(np.unique(labels)) > 1 else len(labels)
    if smallest < k:
        raise ConfigError(
            f"cannot make {k} stratified folds: the rarest label has only {smallest} slide(s)"
        )
    folds = np.empty(len(entries), dtype=np.int64)
    dummy = np.zeros(len(entries))
    if any(e.patient_id for e in entries):
        groups = np.array([e.patient_id or f"slide:{e.slide_id}" for e in entries])
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(dummy, labels, groups)
    else:
        parts = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(dummy, labels)
    for fold, (_, test) in enumerate(parts):
        folds[test] = fold
    return folds


def split_entries(
    entries: Sequence[BagEntry], *, k: int = 5, fold: int = 0, seed: int = 0
) -> dict[str, list[BagEntry]]:
    """train/val/test lists: the manifest's ``split`` column when given, else k-fold.

    With k-fold, fold ``fold`` is the test set, the next fold (mod k) validation, the rest train.
    """
    if any(e.split for e in entries):
        missing = [e.slide_id for e in entries if not e.split]
        if missing:
            raise ConfigError(
                f"the manifest gives splits for some slides but not for {len(missing)} "
                f"(e.g. {missing[0]}): give every slide a split or none"
            )
        return {name: [e for e in entries if e.split == name] for name in SPLITS}
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in 0..{k - 1}, got {fold}")
    folds = kfold_assignment(entries, k, seed)
    val_fold = (fold + 1) % k
    return {
        "train": [e for e, f in zip(entries, folds, strict=True) if f not in (fold, val_fold)],
        "val": [e for e, f in zip(entries, folds, strict=True) if f == val_fold],
        "test": [e for e, f in zip(entries, folds, strict=True) if f == fold],
    }
