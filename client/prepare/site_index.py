"""The site-level files written once every slide is done: the slide index and ``site.json``.

``prepared.csv`` is what training reads (a patch-only run writes ``patches.csv`` instead), and
``site.json`` holds only aggregate facts (no slide ids) because it is what the server's
harmonisation check reads.
"""

from __future__ import annotations

import csv
import io
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpath.client.config import PrepareConfig
from fedpath.client.prepare.layout import SiteLayout
from fedpath.client.prepare.manifest import Manifest, ManifestRow
from fedpath.client.prepare.records import (
    INDEX_COLUMNS,
    INDEX_FILE,
    PATCH_INDEX_FILE,
    SITE_FILE,
    SlideRecord,
)
from fedpath.common import __version__
from fedpath.common.atomic import atomic_write_json, atomic_write_text
from fedpath.common.hashing import sha256_json

if TYPE_CHECKING:  # imported where used: a patch-only run imports no torch
    from fedpath.client.embed.registry import LoadedEncoder


PATCH_INDEX_COLUMNS = (*INDEX_COLUMNS[:-1], "patches")


def write_patch_index(manifest: Manifest, layout: SiteLayout, records: list[SlideRecord]) -> None:
    """A patch-only run's ``patches.csv``: the slides cut and where their patch files are.

    ``prepared.csv`` and ``site.json`` describe feature bags and are left as they are."""
    by_id = {r.slide_id: r for r in records}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PATCH_INDEX_COLUMNS)
    for row in manifest.rows:
        record = by_id[row.slide_id]
        if record.state == "failed":
            continue
        writer.writerow(_index_row(row, record, layout.coords(row.slide_id), layout.root))
    atomic_write_text(layout.root / PATCH_INDEX_FILE, buffer.getvalue())


def _index_row(row: ManifestRow, record: SlideRecord, path: Path, root: Path) -> list[Any]:
    """One slide's line in ``prepared.csv`` / ``patches.csv`` (same columns, other file)."""
    return [
        row.slide_id,
        row.label,
        row.split or "",
        row.patient_id or "",
        "" if row.annotation_complete is None else str(row.annotation_complete).lower(),
        str(record.has_patch_labels).lower(),
        record.num_patches,
        os.path.relpath(path, root),
    ]


def write_site_files(
    manifest: Manifest,
    layout: SiteLayout,
    cfg: PrepareConfig,
    encoder: LoadedEncoder,
    precision: str,
    cosine: float | None,
    site_config: dict[str, Any],
    records: list[SlideRecord],
) -> None:
    """Write the local slide index and the aggregate ``site.json`` the server may compare."""
    by_id = {r.slide_id: r for r in records}
    usable = [row for row in manifest.rows if by_id[row.slide_id].state != "failed"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(INDEX_COLUMNS)
    for row in usable:
        record = by_id[row.slide_id]
        writer.writerow(_index_row(row, record, layout.features(row.slide_id), layout.root))
    atomic_write_text(layout.root / INDEX_FILE, buffer.getvalue())

    label_counts = {label: 0 for label in cfg.labels}
    for row in usable:
        label_counts[row.label] += 1
    site = {
        "fedpath_version": __version__,
        "encoder": encoder.spec.id,
        "encoder_sha256": encoder.weights_sha256,
        "feature_dim": encoder.spec.feature_dim,
        "target_mpp": cfg.resolution.target_mpp,
        "patch_size": cfg.resolution.patch_size,
        "labels": list(cfg.labels),
        "precision": precision,
        "bf16_cosine": cosine,
        "config_sha256": sha256_json(site_config),
        "features_dir": os.path.relpath(layout.root / "features" / layout.encoder_dir, layout.root),
        "slides": {
            "usable": len(usable),
            "failed": sum(1 for r in records if r.state == "failed"),
            "by_label": label_counts,
            "with_patch_labels": sum(1 for row in usable if by_id[row.slide_id].has_patch_labels),
        },
        "patches": sum(by_id[row.slide_id].num_patches for row in usable),
        "prepared_at": _now(),
    }
    atomic_write_json(layout.root / SITE_FILE, site)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
