"""What a site may say about a failure: the error's gist without the hospital's identifiers.

An error reply leaves the hospital like any other reply, so it obeys the same rule: no slide
ids, patient ids or file paths (a file name is usually a slide id, and slide ids can be
accession numbers). The full message stays on the hospital's machine, in the SuperNode's log,
under a short reference that the redacted reply carries: the coordinator reads
"site_a: feature file <file>: 1 patch(es) have NaN or Inf features [ref 3f9c2a1b]" and the
hospital's IT finds the whole line by that reference.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from pathlib import Path

__all__ = ["error_reason", "redact", "site_identifiers"]

logger = logging.getLogger(__name__)

_PATH = re.compile(r"[^\s'\"`:,;()\[\]{}<>/]*/(?:[^\s'\"`:,;()\[\]{}<>]+/?)+")
"""Slash-joined tokens: absolute, home-relative, ./-relative and relative POSIX paths (what
fedpath's messages contain), taken whole: ``features/x/<id>.h5`` leaves nothing behind."""
_NOT_A_PATH = re.compile(r"1/N|1/\d+|n/a|µm/px|(?:train|val|test)(?:/(?:train|val|test))+")
"""Slash-joined words fedpath's own messages use that name no file (δ's bound 1/N = 1/20, a
resolution in µm/px, "train/val"): turned into ``<file>`` they made the reason unreadable
("δ = 0.5 is not below 1<file> = 1<file>") and hid nothing."""


def _path_or_word(match: re.Match[str]) -> str:
    token = match.group(0)
    return token if _NOT_A_PATH.fullmatch(token) else "<file>"


_ID_COLUMNS = ("slide_id", "patient_id")


def site_identifiers(data_dir: Path | None) -> set[str]:
    """Slide and patient ids the site's manifests name (empty when none can be read)."""
    if data_dir is None:
        return set()
    ids: set[str] = set()
    for name in ("prepared.csv", "manifest.csv", "slides.csv"):
        path = data_dir / name
        try:
            with path.open(newline="", encoding="utf-8", errors="replace") as fh:
                for row in csv.DictReader(fh):
                    ids.update(v for k in _ID_COLUMNS if (v := (row.get(k) or "").strip()))
        except (OSError, csv.Error):
            continue
    return ids


def redact(text: str, identifiers: set[str]) -> str:
    """``text`` with paths replaced by ``<file>`` and every known identifier by ``<slide>``.

    Longer identifiers are replaced first, so an id that contains another is removed whole.
    """
    out = _PATH.sub(_path_or_word, text)
    for ident in sorted(identifiers, key=len, reverse=True):
        out = out.replace(ident, "<slide>")
    return out


def error_reason(site: str, exc: BaseException, data_dir: Path | None) -> str:
    """The reply's reason for ``exc``; the unredacted message is logged (an error on this
    module's logger: the SuperNode's log, :mod:`fedpath.client.node_log`).

    The reference is a hash of the full message, so the same failure in every retry of a
    round carries the same reference.
    """
    full = f"{type(exc).__name__}: {exc}"
    ref = hashlib.sha256(full.encode("utf-8", "replace")).hexdigest()[:8]
    logger.error(f"[{site}] error [ref {ref}]: {full}")
    return f"{site}: {redact(str(exc), site_identifiers(data_dir))} [ref {ref}]"
