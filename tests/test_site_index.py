"""Training index and splits: labels checked, patients never straddle folds, folds stratified."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedpath.client.prepare.records import INDEX_COLUMNS
from fedpath.client.training.site_index import (
    BagEntry,
    kfold_assignment,
    load_site_index,
    split_entries,
)
from fedpath.common.errors import ConfigError

LABELS = ("normal", "tumour")


def _site(tmp_path: Path, rows: list[str]) -> Path:
    (tmp_path / "features").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "features" / f"{name}.h5").write_bytes(b"")
    header = ",".join(INDEX_COLUMNS) + "\n"  # the format prepare writes
    (tmp_path / "prepared.csv").write_text(header + "\n".join(rows) + "\n")
    return tmp_path


def test_index_is_parsed(tmp_path: Path) -> None:
    site = _site(
        tmp_path,
        [
            "a,tumour,train,p1,true,true,12,features/a.h5",
            "b,normal,val,p2,,false,7,features/b.h5",
        ],
    )
    a, b = load_site_index(site, LABELS)
    assert a == BagEntry("a", 1, site / "features/a.h5", "train", "p1", True, True, 12)
    assert b.label == 0 and b.annotation_complete is None and not b.has_patch_labels


def test_index_problems_are_listed(tmp_path: Path) -> None:
    site = _site(
        tmp_path,
        ["a,cancer,,,,false,1,features/a.h5", "b,normal,nope,,,false,1,features/b.h5"],
    )
    with pytest.raises(ConfigError) as info:
        load_site_index(site, LABELS)
    text = str(info.value)
    assert "line 2: label 'cancer' not in" in text and "line 3: unknown split 'nope'" in text
    with pytest.raises(ConfigError, match="not a prepared site"):
        load_site_index(tmp_path / "nowhere", LABELS)


def test_a_missing_feature_file_is_left_to_the_bag_loader(tmp_path: Path) -> None:
    """Leaving the slide out of the index would move every other slide's k-fold: the slide stays
    an entry and is skipped when its bag loads (``tests/test_bags.py``)."""
    site = _site(
        tmp_path,
        ["a,tumour,,,,false,1,features/a.h5", "b,normal,,,,false,1,features/missing.h5"],
    )
    entries = load_site_index(site, LABELS)
    assert [e.slide_id for e in entries] == ["a", "b"]
    assert entries[1].features == site / "features" / "missing.h5"


def _entries(n: int, patients: bool) -> list[BagEntry]:
    return [
        BagEntry(
            slide_id=f"s{i}",
            label=i % 2,
            features=Path(f"s{i}.h5"),
            split=None,
            patient_id=f"p{i // 2}" if patients else None,
            has_patch_labels=False,
            annotation_complete=None,
            num_patches=10,
        )
        for i in range(n)
    ]


def test_kfold_keeps_patients_together_and_is_stratified() -> None:
    entries = _entries(40, patients=True)
    folds = kfold_assignment(entries, k=5, seed=3)
    by_patient: dict[str, set[int]] = {}
    for entry, fold in zip(entries, folds, strict=True):
        by_patient.setdefault(entry.patient_id or "", set()).add(int(fold))
    assert all(len(f) == 1 for f in by_patient.values())
    labels = np.array([e.label for e in entries])
    for fold in range(5):
        assert labels[folds == fold].mean() == pytest.approx(0.5, abs=0.2)
    np.testing.assert_array_equal(folds, kfold_assignment(entries, k=5, seed=3))
    assert not np.array_equal(folds, kfold_assignment(entries, k=5, seed=4))


def test_split_entries_from_folds_and_from_column() -> None:
    entries = _entries(30, patients=False)
    parts = split_entries(entries, k=5, fold=2, seed=0)
    ids = {name: {e.slide_id for e in part} for name, part in parts.items()}
    assert len(ids["test"]) == 6 and len(ids["val"]) == 6 and len(ids["train"]) == 18
    assert not (ids["test"] & ids["val"]) and not (ids["train"] & ids["test"])
    given = [e.__class__(**{**e.__dict__, "split": "train"}) for e in entries]
    assert len(split_entries(given)["train"]) == 30
    partial = [given[0], *entries[1:]]
    with pytest.raises(ConfigError, match="splits for some slides"):
        split_entries(partial)
    with pytest.raises(ConfigError, match="rarest label has only 1"):
        kfold_assignment(_entries(3, patients=False), k=2, seed=0)
