"""Whether an earlier run's outputs for a slide can be kept instead of preparing it again.

An unattended run is killed halfway, or the manifest grows by a few slides: the next run must
skip what is finished, and only that. An output is trusted when it carries this run's settings
hash (``settings_hash``) and the slide is still the file it was made from (``fingerprint``); a
feature run may also embed the patch file an earlier run cut, instead of cutting again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpath.client.config import PrepareConfig
from fedpath.client.prepare.fingerprint import SlideFingerprint
from fedpath.client.prepare.layout import SiteLayout
from fedpath.client.prepare.manifest import ManifestRow
from fedpath.client.prepare.patchfile import PatchFile, read_patch_file
from fedpath.client.prepare.records import SlideRecord
from fedpath.common.errors import FedpathError
from fedpath.common.featurebag import read_attrs
from fedpath.common.hashing import SAMPLE_SCHEME


@dataclass(frozen=True)
class Reuse:
    """A finished slide to keep: this run's record and the status file to write."""

    record: SlideRecord
    status: dict[str, Any]


def reuse(
    layout: SiteLayout,
    row: ManifestRow,
    cfg: PrepareConfig,
    hashes: tuple[str, str],
    slide: SlideFingerprint,
    now: str,
) -> Reuse | str:
    """The reuse of a finished slide's outputs, or why they cannot be reused.

    Reused when the bag (patch-only: the patch file) carries this run's settings hash
    (``hashes``: features', patches') and the slide is the file it was made from: same total
    size, and either the same (size, mtime, ctime, inode) of every file (the fast path, no byte
    read) or, after a copy, move, restore or ``touch``, the same sampled content hash. A bag is
    kept only beside the patch file it was embedded from. The status file keeps the record of
    the run that prepared the slide; ``last_checked`` and ``last_run_outcome`` say what this
    run did.
    """
    features, coords = layout.features(row.slide_id), layout.coords(row.slide_id)
    if cfg.patch_only:
        if not coords.is_file():
            return "not cut yet"
        target, key, wanted = coords, "patches_config_sha256", hashes[1]
    else:
        if not (features.is_file() and coords.is_file()):
            return "not prepared yet"
        target, key, wanted = features, "config_sha256", hashes[0]
        try:
            cut_with = read_attrs(coords).get("patches_config_sha256")
        except FedpathError:
            return "its patch file cannot be read"
        if cut_with is not None and cut_with != hashes[1]:  # None: made before patch files
            return "its patches were cut again with other settings"
    try:
        attrs = read_attrs(target)
    except FedpathError:
        return f"its {'patch' if cfg.patch_only else 'feature'} file cannot be read"
    if cfg.patch_only and key not in attrs:
        return "its patch file was written by an earlier fedpath (no settings hash)"
    if attrs.get(key) != wanted:
        return "settings, encoder or annotation changed"
    changed = _slide_changed(attrs, slide, layout, row)
    if changed:
        return changed
    if cfg.patch_only and cfg.write_qc and not _has_qc(layout, row.slide_id):
        return "its QC picture or contours are missing"
    previous = _read_status(layout.status(row.slide_id))
    same_run = previous is not None and previous.get("prepared_at") == attrs.get("prepared_at")
    if same_run and previous is not None and previous.get("state") == "done":
        status = dict(previous)
    else:  # the status file is missing or older than the outputs: rebuild it from them
        status = {
            "slide_id": row.slide_id,
            "state": "done",
            "num_patches": int(attrs.get("num_patches", 0)),
            "tumour_patches": attrs.get("tumour_patches"),
            "mpp": attrs.get("level0_mpp"),
            "mpp_source": attrs.get("mpp_source"),
            "has_patch_labels": bool(attrs.get("has_patch_labels", False)),
            "embedded": not cfg.patch_only,
            "seconds": {},
            "prepared_at": attrs.get("prepared_at"),
            "recorded_at": attrs.get("prepared_at"),
        }
    reused = ("patches",) if cfg.patch_only else ("patches", "features")
    status.update(
        line=row.line,
        last_checked=now,
        last_run_outcome="reused",
        last_run_reused=list(reused),
        slide_stat_sha256=slide.stat_sha256,
    )
    what = "cut" if cfg.patch_only else "prepared"
    record = SlideRecord(
        slide_id=row.slide_id,
        state="reused",
        reason=f"{what} {attrs.get('prepared_at') or 'earlier'}; slide and settings unchanged",
        num_patches=int(attrs.get("num_patches", 0)),
        tumour_patches=attrs.get("tumour_patches"),
        mpp=attrs.get("level0_mpp"),
        mpp_source=attrs.get("mpp_source"),
        has_patch_labels=bool(attrs.get("has_patch_labels", False)),
        annotation=status.get("annotation"),
        embedded=not cfg.patch_only,
        reused=reused,
    )
    return Reuse(record, status)


def _slide_changed(
    attrs: dict[str, Any], slide: SlideFingerprint, layout: SiteLayout, row: ManifestRow
) -> str | None:
    """Why the slide is no longer the file an output (its ``attrs``) was made from, or None."""
    if attrs.get("slide_sample_scheme") != SAMPLE_SCHEME or attrs.get("slide_bytes") != slide.size:
        return "slide file changed (size)"
    previous = _read_status(layout.status(row.slide_id))
    checked = {attrs.get("slide_stat_sha256")}
    if previous is not None and previous.get("prepared_at") == attrs.get("prepared_at"):
        checked.add(previous.get("slide_stat_sha256"))  # a later run saw it unchanged
    if slide.stat_sha256 not in checked and slide.sample_sha256() != attrs.get(
        "slide_sample_sha256"
    ):
        return "slide file changed (content differs from when it was prepared)"
    return None


def _has_qc(layout: SiteLayout, slide_id: str) -> bool:
    return layout.qc(slide_id).is_file() and layout.contours(slide_id).is_file()


def reusable_patches(
    layout: SiteLayout,
    row: ManifestRow,
    cfg: PrepareConfig,
    patch_hash: str,
    slide: SlideFingerprint,
) -> PatchFile | str:
    """An earlier run's patch file to embed without cutting again, or why it cannot serve.

    It serves when it was cut from this very slide (``_slide_changed``) with these patching,
    tissue and annotation settings (``patch_hash``) and, if QC is on, its pictures are there."""
    path = layout.coords(row.slide_id)
    if not path.is_file():
        return "no patch file yet"
    try:
        attrs = read_attrs(path)
    except FedpathError:
        return "its patch file cannot be read"
    if "patches_config_sha256" not in attrs:
        return "its patch file was written by an earlier fedpath (no settings hash)"
    if attrs.get("patches_config_sha256") != patch_hash:
        return "patching settings or annotation changed since the patches were cut"
    changed = _slide_changed(attrs, slide, layout, row)
    if changed:
        return changed
    if cfg.write_qc and not _has_qc(layout, row.slide_id):
        return "its QC picture or contours are missing"
    try:
        return read_patch_file(path)
    except FedpathError as exc:
        return str(exc)


def _read_status(path: Path) -> dict[str, Any] | None:
    """A slide's status file, or None when it is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
