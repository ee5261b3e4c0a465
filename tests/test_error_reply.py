"""Error replies leave the hospital: they carry the gist and a reference, never its identifiers."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedpath.client.error_reply import error_reason, redact, site_identifiers
from fedpath.common.errors import FeatureBagError


def _site(tmp_path: Path) -> Path:
    (tmp_path / "prepared.csv").write_text(
        "slide_id,label,patient_id,features\n"
        "RH-2024-00017_A1,tumour,P-88213,features/x/RH-2024-00017_A1.h5\n"
        "RH-2024-00017_A10,normal,P-88214,features/x/RH-2024-00017_A10.h5\n"
    )
    return tmp_path


def test_paths_and_site_identifiers_are_redacted(tmp_path: Path) -> None:
    ids = site_identifiers(_site(tmp_path))
    assert ids == {"RH-2024-00017_A1", "RH-2024-00017_A10", "P-88213", "P-88214"}
    text = (
        "feature file /data/fedpath/features/x/RH-2024-00017_A10.h5: bad; slide "
        "RH-2024-00017_A10 of P-88214 (see ~/notes.txt and ./local/file)"
    )
    out = redact(text, ids)
    for secret in ("RH-2024", "P-882", "/data", "notes", "local/file", "A10"):
        assert secret not in out, secret
    assert out == "feature file <file>: bad; slide <slide> of <slide> (see <file> and <file>)"
    assert site_identifiers(tmp_path / "nowhere") == set() == site_identifiers(None)


def test_error_reason_logs_the_full_message_under_the_reference(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = _site(tmp_path)
    exc = FeatureBagError(
        str(site / "features/x/RH-2024-00017_A1.h5"), "1 patch(es) have NaN or Inf features"
    )
    caplog.set_level(logging.ERROR, logger="fedpath.client.error_reply")
    reason = error_reason("site_a", exc, site)
    assert reason.startswith("site_a: feature file <file>: 1 patch(es) have NaN or Inf")
    ref = reason.rsplit("[ref ", 1)[1].rstrip("]")
    assert len(ref) == 8 and "RH-2024" not in reason and str(tmp_path) not in reason
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.name == "fedpath.client.error_reply"
    assert f"[ref {ref}]" in record.getMessage() and "RH-2024-00017_A1.h5" in record.getMessage()
    assert error_reason("site_a", exc, site) == reason  # same failure, same ref
