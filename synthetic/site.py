"""Prepared sites made of synthetic feature bags (no slides): federation tests and simulation.

Rendering and embedding real synthetic slides costs minutes per site; testing the round loop,
resuming, or simulating 20+ hospitals needs sites in seconds. This writes exactly what
``fedpath prepare`` leaves behind (``prepared.csv``, ``site.json``, feature bags with patch
labels on annotated slides), so every consumer downstream runs its real code on them.

Features are Gaussian noise with a tumour direction added to the tumour patches of tumour
slides and a per-site offset (a "stain" shift that a site-local model overfits to), so MIL
models can learn something non-trivial and sites differ the way real hospitals do.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpath.client.prepare.records import INDEX_COLUMNS, INDEX_FILE, SITE_FILE
from fedpath.common import __version__
from fedpath.common.atomic import atomic_write_json, atomic_write_text
from fedpath.common.featurebag import FeatureBagWriter

__all__ = ["SyntheticSiteSpec", "write_synthetic_site"]

ENCODER_ID = "synthetic"
ENCODER_SHA = "5" * 64


@dataclass(frozen=True)
class SyntheticSiteSpec:
    """Size and character of one synthetic site."""

    n_slides: int = 16
    feature_dim: int = 32
    patches: tuple[int, int] = (20, 60)
    """Patches per slide, drawn uniformly in this range."""
    tumour_share: float = 0.5
    annotated_share: float = 0.25
    """Share of tumour slides with patch labels (complete annotations)."""
    signal: float = 1.5
    """Norm of the tumour direction added to tumour patches."""
    site_shift: float = 0.5
    splits: tuple[float, float] = (0.6, 0.2)
    """Shares of train and val slides (the rest is test), stratified by label."""


def _split_names(labels: np.ndarray, shares: tuple[float, float]) -> list[str]:
    names = [""] * len(labels)
    for value in (0, 1):
        idx = np.flatnonzero(labels == value)
        n_train = max(1, round(shares[0] * len(idx)))
        n_val = max(1, round(shares[1] * len(idx))) if len(idx) > 2 else 0
        for j, i in enumerate(idx):
            names[i] = "train" if j < n_train else "val" if j < n_train + n_val else "test"
    return names


def write_synthetic_site(root: Path, spec: SyntheticSiteSpec, seed: int) -> Path:
    """Write a prepared site under ``root``; deterministic in ``(spec, seed)``."""
    rng = np.random.default_rng(seed)
    direction_rng = np.random.default_rng(12345)  # the tumour direction is shared by all sites
    direction = direction_rng.normal(size=spec.feature_dim)
    direction *= spec.signal / np.linalg.norm(direction)
    shift = rng.normal(size=spec.feature_dim) * spec.site_shift / np.sqrt(spec.feature_dim)
    n_tumour = round(spec.tumour_share * spec.n_slides)
    labels = np.array([1] * n_tumour + [0] * (spec.n_slides - n_tumour))
    rng.shuffle(labels)
    splits = _split_names(labels, spec.splits)
    tumour_train = [i for i in range(spec.n_slides) if labels[i] == 1 and splits[i] == "train"]
    n_annot = round(spec.annotated_share * len(tumour_train))
    annotated = (
        set(rng.choice(tumour_train, size=n_annot, replace=False).tolist()) if n_annot else set()
    )
    rows: list[list[str]] = []
    (root / "features").mkdir(parents=True, exist_ok=True)
    for i in range(spec.n_slides):
        slide_id = f"slide_{i:03d}"
        n = int(rng.integers(spec.patches[0], spec.patches[1] + 1))
        feats = rng.normal(size=(n, spec.feature_dim)) + shift
        patch_labels = np.zeros(n, dtype=np.int8)
        if labels[i] == 1:
            fraction = rng.uniform(0.1, 0.7)
            tumour = rng.random(n) < fraction
            tumour[rng.integers(n)] = True
            feats[tumour] += direction
            patch_labels[tumour] = 1
        # Val/test slides carry ground-truth patch labels so patch AUC can be measured; of the
        # training slides only the "annotated" ones do, as at a real site.
        has_labels = i in annotated or splits[i] != "train"
        rel = f"features/{ENCODER_ID}/{slide_id}.h5"
        attrs = {
            "encoder": ENCODER_ID,
            "encoder_sha256": ENCODER_SHA,
            "feature_dim": spec.feature_dim,
            "patch_size_px": 256,
            "target_mpp": 0.5,
            "config_sha256": "0" * 64,
            "slide_id": slide_id,
        }
        coords = np.stack([np.arange(n) * 256, np.zeros(n, dtype=np.int64)], axis=1)
        with FeatureBagWriter(
            root / rel,
            coords=coords,
            feature_dim=spec.feature_dim,
            attrs=attrs,
            patch_labels=patch_labels if has_labels else None,
        ) as writer:
            writer.write(feats.astype(np.float32))
        rows.append(
            [
                slide_id,
                "tumour" if labels[i] == 1 else "normal",
                splits[i],
                "",
                "true" if has_labels else "",
                str(has_labels).lower(),
                str(n),
                rel,
            ]
        )
    buffer = io.StringIO()
    writer_csv = csv.writer(buffer, lineterminator="\n")
    writer_csv.writerow(INDEX_COLUMNS)
    writer_csv.writerows(rows)
    atomic_write_text(root / INDEX_FILE, buffer.getvalue())
    atomic_write_json(
        root / SITE_FILE,
        {
            "fedpath_version": __version__,
            "encoder": ENCODER_ID,
            "encoder_sha256": ENCODER_SHA,
            "feature_dim": spec.feature_dim,
            "target_mpp": 0.5,
            "patch_size": 256,
            "labels": ["normal", "tumour"],
            "slides": {
                "usable": spec.n_slides,
                "failed": 0,
                "by_label": {"normal": int((labels == 0).sum()), "tumour": int(labels.sum())},
                "with_patch_labels": sum(1 for r in rows if r[5] == "true"),
            },
            "patches": sum(int(r[6]) for r in rows),
        },
    )
    return root
