"""Each hospital's own prepared site directory, as its ClientApp reads it in a benchmark.

A hospital's disk decides what its training sees: a slide whose outlines it may not use is
a feature bag *without* patch labels there. The site index only accepts feature paths inside
the site directory, so ``features/`` holds links to the prepared bags (or label-free copies).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import h5py

from bench.prepared_cohort import PreparedCohort
from fedpath.client.prepare.records import INDEX_COLUMNS, INDEX_FILE, SITE_FILE
from fedpath.client.training.site_index import BagEntry
from fedpath.common.atomic import atomic_path, atomic_write_text
from fedpath.common.hashing import sha256_json

VIEW_LAYOUT = 2
"""Bumped when the way a hospital's cached view is written changes (new cache key)."""


def without_patch_labels(source: Path, target: Path) -> None:
    """Copy a feature bag minus its patch labels and tumour fractions (atomically)."""
    with atomic_path(target) as tmp, h5py.File(source, "r") as src, h5py.File(tmp, "w") as dst:
        for name in src:
            if name not in ("patch_labels", "tumour_fraction"):
                src.copy(src[name], dst, name=name)
        for key, value in src.attrs.items():
            dst.attrs[key] = value


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy of the features), or an atomic copy across file systems."""
    try:
        os.link(source, target)
    except OSError:
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)


def manifest_row(entry: BagEntry, split: str, features: Path, labelled: bool) -> dict[str, str]:
    """``entry``'s row of a site's ``prepared.csv``: patch labels shown only when ``labelled``."""
    return {
        "slide_id": entry.slide_id,
        "label": ("normal", "tumour")[entry.label],
        "split": split,
        "patient_id": entry.patient_id or "",
        "annotation_complete": (
            ""
            if not labelled or entry.annotation_complete is None
            else str(entry.annotation_complete).lower()
        ),
        "has_patch_labels": "true" if labelled else "false",
        "num_patches": str(entry.num_patches),
        "features": str(features),
    }


def write_site_views(
    cohort: PreparedCohort, visible: frozenset[str], root: Path
) -> dict[str, Path]:
    """One prepared site directory per hospital with only the outlines it may train on.

    Feature files live inside the site directory, as a hospital's own ``prepare`` leaves them
    (the site index refuses paths that leave it): a hard link to the prepared file (a copy
    where linking fails), or a label-free copy for a slide whose patch labels the hospital
    may not use. Splits are fixed in the manifest (``split`` column), so the ClientApp trains,
    validates and tests on exactly the slides the centralised and single-site arms use.
    Cached by the visible set.
    """
    key = sha256_json({"layout": VIEW_LAYOUT, "visible": sorted(visible)})[:12]
    base = root / f"views-{key}"
    views = {}
    for hospital in cohort.hospitals:
        site = base / hospital.name
        views[hospital.name] = site
        if (site / INDEX_FILE).is_file():
            continue
        stripped = site / "features"
        stripped.mkdir(parents=True, exist_ok=True)
        rows = []
        for split in ("train", "val", "test"):
            for entry in getattr(hospital, split):
                labelled = split == "train" and entry.slide_id in visible
                features = stripped / entry.features.name
                if not features.is_file():
                    if entry.has_patch_labels and not labelled:
                        without_patch_labels(entry.features, features)
                    else:
                        _link_or_copy(entry.features, features)
                rows.append(manifest_row(entry, split, features.relative_to(site), labelled))
        source_facts = hospital.train[0].features.parents[2] / SITE_FILE
        shutil.copyfile(source_facts, site / SITE_FILE)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=INDEX_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(site / INDEX_FILE, out.getvalue())  # last: marks the view done
    return views


def write_site_dirs(cohort: PreparedCohort, visible: frozenset[str], root: Path) -> dict[str, Path]:
    """One fresh prepared site directory per hospital under ``root``, as its ClientApp sees it.

    A hospital's disk decides what its training sees: slides whose outlines it may not use
    point at a label-free copy of their feature bag (made once, cached next to the cohort).
    The site index only accepts feature paths inside the site, so ``features/`` holds
    symlinks; the manifest fixes the splits the centralised arms use. A fresh directory per
    run also gives every run an empty privacy ledger (written into the site directory), so
    the ε a site reports is that run's alone.
    """
    stripped = cohort.root / "privacy" / "label-free"
    stripped.mkdir(parents=True, exist_ok=True)
    sites = {}
    for hospital in cohort.hospitals:
        site = root / hospital.name
        (site / "features").mkdir(parents=True)
        rows = []
        for split in ("train", "val", "test"):
            for entry in getattr(hospital, split):
                labelled = split == "train" and entry.slide_id in visible
                source = entry.features
                if entry.has_patch_labels and not labelled:
                    source = stripped / entry.features.name
                    if not source.is_file():
                        without_patch_labels(entry.features, source)
                link = Path("features") / f"{entry.slide_id}.h5"
                (site / link).symlink_to(source.resolve())
                rows.append(manifest_row(entry, split, link, labelled))
        prepared = cohort.root / "prepared" / cohort.spec.prepare_key() / hospital.name
        shutil.copyfile(prepared / SITE_FILE, site / SITE_FILE)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=INDEX_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(site / INDEX_FILE, out.getvalue())
        sites[hospital.name] = site
    return sites
