"""``fedpath prepare``: a hospital's manifest in, provenance-stamped feature bags out.

The run is built for unattended use on a CPU-only machine:
- the manifest is validated before any slide is opened (all problems at once, reported as
  failed items before the first slide starts); its bad rows are not prepared, the others are;
- each slide is independent: a corrupt file, missing MPP, empty tissue or broken annotation
  is recorded with its reason, its outputs are left untouched, and the next slide goes on;
- every output is written atomically, the feature bag first, so a killed run leaves nothing
  that a resumed run would trust;
- a slide whose feature bag already carries this run's config hash and whose file is still the
  one the bag was made from (``client.prepare.fingerprint``) is reused (resume); its status file
  keeps the record of the run that prepared it, with ``last_checked`` added;
- a write the system refuses (disk full, file too large, read-only) fails that slide with one
  message naming the file (``OutputWriteError``) and leaves no temporary behind;
- ``site.json`` holds only aggregate facts (no slide ids) because it is what the server's
  harmonisation check reads;
- a patch-only run (``patch_only``) stops before the encoder: it writes each slide's patch file
  (``patches/<id>.h5``: coordinates, labels, the settings hash and the slide's fingerprint),
  QC pictures and ``patches.csv``, and imports no torch. A later run embeds a patch file cut
  from the same slide file with the same patching settings instead of segmenting again.

The work is split where it divides: this module runs the site (manifest, lock, reuse or
prepare each row, status files, summary); ``slide`` prepares one slide; ``resume`` decides
what an earlier run left that can be kept; ``settings_hash`` and ``layout`` say what outputs
depend on and where they are; ``site_index`` writes ``prepared.csv`` and ``site.json``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpath.client.config import PrepareConfig
from fedpath.client.prepare import slide as one_slide
from fedpath.client.prepare.fingerprint import fingerprint
from fedpath.client.prepare.layout import SiteLayout, encoder_dir_name
from fedpath.client.prepare.manifest import Manifest, ManifestRow, RejectedRow, load_manifest
from fedpath.client.prepare.patchfile import PatchFile
from fedpath.client.prepare.records import (
    PrepareEvents,
    PrepareSummary,
    SilentEvents,
    SlideRecord,
)
from fedpath.client.prepare.resume import Reuse, reusable_patches, reuse
from fedpath.client.prepare.settings_hash import (
    features_config,
    patches_config_sha256,
    slide_config_sha256,
)
from fedpath.client.prepare.site_index import write_patch_index, write_site_files
from fedpath.common.atomic import (
    OutputWriteError,
    atomic_write_json,
    os_error_text,
    remove_stale_temporaries,
)
from fedpath.common.errors import FedpathError, SlideError
from fedpath.common.locking import LOCK_NAME, exclusive_directory

if TYPE_CHECKING:  # imported where used: a patch-only run imports no torch
    from fedpath.client.embed.inference import InferencePlan
    from fedpath.client.embed.registry import LoadedEncoder


PATCH_ONLY = "patch-only"
"""The precision a patch-only run reports: it embeds nothing."""


def _failure_reason(error: Exception) -> str:
    """The message a person needs, naming the file at fault.

    A slide error drops its slide-id prefix (the record already names the slide); any other
    fedpath error keeps its full text, because there the prefix is the *other* file at fault
    (the annotation, the feature file) that the admin has to open.
    """
    if isinstance(error, SlideError):
        return error.reason
    if isinstance(error, FedpathError):
        return str(error)
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {os_error_text(error)}"
    return f"{type(error).__name__}: {error}"


def prepare_site(
    manifest: Path,
    out_dir: Path,
    cfg: PrepareConfig,
    *,
    events: PrepareEvents | None = None,
    slide_root: Path | None = None,
    overwrite: bool = False,
) -> PrepareSummary:
    """Prepare every slide of ``manifest`` into ``out_dir``; raises only for site-wide problems.

    Raises ``ManifestError`` (nothing done) when the manifest as a whole is unusable, or
    ``EncoderError`` (nothing done). Per-slide problems, including a manifest row that failed
    validation, are returned as failed records.
    """
    started = time.perf_counter()
    sink: PrepareEvents = events if events is not None else SilentEvents()
    parsed = load_manifest(manifest, cfg.labels, slide_root=slide_root)
    out = Path(out_dir).expanduser().resolve()
    with _owned_output(out):
        remove_stale_temporaries(out)
        return _prepare_locked(parsed, out, cfg, sink, started, overwrite)


@contextmanager
def _owned_output(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock; an output folder that cannot be created or written to is one
    ``OutputWriteError`` naming it (nothing was prepared), not a traceback."""
    lock = exclusive_directory(out, "prepare")
    try:
        lock.__enter__()
    except OSError as exc:
        raise OutputWriteError(out / LOCK_NAME, exc) from exc
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _prepare_locked(
    parsed: Manifest,
    out: Path,
    cfg: PrepareConfig,
    sink: PrepareEvents,
    started: float,
    overwrite: bool,
) -> PrepareSummary:
    """The body of ``prepare_site``, run while this process owns ``out``."""

    encoder: LoadedEncoder | None = None
    inference: InferencePlan | None = None
    encoder_notes: tuple[str, ...] = ()
    precision, cosine = PATCH_ONLY, None
    site_config: dict[str, Any] = {}
    if cfg.patch_only:  # no encoder: nothing of torch is imported
        layout = SiteLayout(out, encoder_dir_name(cfg.embedding.encoder))
        sink.site_started(len(parsed.rows) + len(parsed.rejected), "none", PATCH_ONLY)
    else:
        from fedpath.client.embed.catalog import resolution_mismatch
        from fedpath.client.embed.inference import plan_inference
        from fedpath.client.embed.registry import load_encoder

        sink.stage_started("encoder", cfg.embedding.encoder)
        encoder = load_encoder(cfg.embedding.encoder, cfg.embedding.weights_path)
        sink.stage_started("inference plan", encoder.spec.id)
        inference = plan_inference(encoder, cfg.embedding)  # device, engine, precision, batch
        precision, cosine = inference.precision, inference.precision_cosine
        mismatch = resolution_mismatch(encoder.spec.id, cfg.resolution.target_mpp)
        encoder_notes = (mismatch,) if mismatch else ()
        layout = SiteLayout(out, encoder_dir_name(encoder.spec.id))
        site_config = features_config(cfg, encoder, precision)
        sink.site_started(len(parsed.rows) + len(parsed.rejected), encoder.spec.id, precision)

    # Rejected rows first: every manifest problem is on screen before hours of embedding start.
    records = [_record_rejected(rejected, layout, sink) for rejected in parsed.rejected]
    embed_seconds = 0.0
    for row in parsed.rows:
        record, status = _process_row(
            row, layout, cfg, encoder, precision, site_config, sink, overwrite
        )
        embed_seconds += record.seconds.get("embedding", 0.0)
        try:
            atomic_write_json(layout.status(row.slide_id), status)
        except OutputWriteError as exc:
            # The outputs are complete (a later run reuses them) but this run cannot say so:
            # the slide is left out of prepared.csv rather than listed without a record.
            record = SlideRecord(
                slide_id=row.slide_id, state="failed", reason=str(exc), stage="status"
            )
        records.append(record)
        sink.slide_finished(record)

    site_error = None
    try:
        if encoder is None:
            write_patch_index(parsed, layout, records)
        else:
            write_site_files(parsed, layout, cfg, encoder, precision, cosine, site_config, records)
    except OutputWriteError as exc:
        site_error = str(exc)
    return PrepareSummary(
        out_dir=out,
        records=tuple(records),
        encoder=encoder.spec.id if encoder is not None else "",
        precision=precision,
        bf16_cosine=cosine,
        seconds=time.perf_counter() - started,
        embed_seconds=embed_seconds,
        site_error=site_error,
        patch_only=encoder is None,
        inference=inference.describe() if inference is not None else "",
        inference_notes=(*inference.notes, *encoder_notes) if inference else encoder_notes,
    )


def _process_row(
    row: ManifestRow,
    layout: SiteLayout,
    cfg: PrepareConfig,
    encoder: LoadedEncoder | None,
    precision: str,
    site_config: dict[str, Any],
    sink: PrepareEvents,
    overwrite: bool,
) -> tuple[SlideRecord, dict[str, Any]]:
    """Reuse, prepare, or fail one valid row; returns its record and its status file.

    Without ``encoder`` (patch-only) the slide is cut and labelled only. With one, a patch file
    an earlier run cut from this slide with these settings is embedded as it is."""
    now = _now()
    reusable: PatchFile | None = None
    try:
        slide = fingerprint(row.path)
        hashes = (slide_config_sha256(site_config, row), patches_config_sha256(cfg, row))
        why = "--overwrite" if overwrite else reuse(layout, row, cfg, hashes, slide, now)
        if isinstance(why, Reuse):
            return why.record, why.status
        why_cut = why
        if encoder is not None and not overwrite:
            found = reusable_patches(layout, row, cfg, hashes[1], slide)
            reusable, why_cut = (found, "") if isinstance(found, PatchFile) else (None, found)
        slide_attrs = {**slide.attrs(slide.sample_sha256()), "prepared_at": now}
    except OSError as exc:
        name = exc.filename or row.path
        failed = SlideRecord(
            slide_id=row.slide_id,
            state="failed",
            reason=f"cannot read {name}: {os_error_text(exc)}",
            stage="open",
        )
        return failed, _status(failed, row, now)
    try:
        record = one_slide.prepare_slide(
            row, layout, cfg, encoder, precision, hashes, sink, slide_attrs, reusable
        )
        if fingerprint(row.path).stat_sha256 != slide.stat_sha256:
            for path in layout.outputs(row.slide_id):
                path.unlink(missing_ok=True)
            raise one_slide.SlideFailure(
                "outputs",
                SlideError(
                    row.slide_id,
                    "the slide file changed while it was being prepared; its outputs were "
                    "removed: run again once the file is complete",
                ),
            )
    except (one_slide.SlideFailure, OSError) as failure:
        error = failure.error if isinstance(failure, one_slide.SlideFailure) else failure
        stage = failure.stage if isinstance(failure, one_slide.SlideFailure) else "open"
        failed = SlideRecord(
            slide_id=row.slide_id,
            state="failed",
            reason=_failure_reason(error),
            stage=stage,
            annotation=_no_tumour_summary(error),
        )
        return failed, _status(failed, row, now)
    status = {**_status(record, row, now), "prepared_at": now, "why_prepared": why}
    status["slide_stat_sha256"] = slide.stat_sha256
    status["last_run_reused"] = list(record.reused)
    if reusable is None:
        status["why_patches_cut"] = why_cut
    return record, status


def _no_tumour_summary(error: Exception) -> dict[str, Any] | None:
    """The annotation block of a slide failed for having no tumour region (else None)."""
    annotations = sys.modules.get(
        "fedpath.client.wsi.annotations"
    )  # not loaded: no annotation read
    if annotations is not None and isinstance(error, annotations.NoTumourRegionError):
        return dict(error.summary)
    return None


def _status(record: SlideRecord, row: ManifestRow, now: str) -> dict[str, Any]:
    """The status file of a slide this run prepared or failed."""
    outcome = "prepared" if record.state == "done" else record.state
    return {
        **record.to_json(),
        "line": row.line,
        "recorded_at": now,
        "last_checked": now,
        "last_run_outcome": outcome,
    }


def _record_rejected(rejected: RejectedRow, layout: SiteLayout, sink: PrepareEvents) -> SlideRecord:
    """A failed record for a manifest row that cannot be prepared, like a slide that failed to
    read: in the summary, in its status file, and in the events sink."""
    record = SlideRecord(
        slide_id=rejected.slide_id or "(no id)",
        state="failed",
        reason="; ".join(rejected.problems),
        stage="manifest",
    )
    now = _now()
    status = {
        **record.to_json(),
        "line": rejected.line,
        "lines": list(rejected.lines),
        "recorded_at": now,
        "last_checked": now,
        "last_run_outcome": "failed",
    }
    try:
        atomic_write_json(layout.rejected_status(rejected), status)
    except OutputWriteError as exc:
        record = SlideRecord(
            slide_id=record.slide_id,
            state="failed",
            reason=f"{record.reason}; and {exc}",
            stage=record.stage,
        )
    sink.slide_finished(record)
    return record


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
