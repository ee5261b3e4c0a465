"""Floats for strict JSON, shared by the slide and patch metric results.

Run reports must parse as strict JSON, which has no NaN, yet an undefined metric (one class on
a site, no labelled patch) is an ordinary result: it is written as ``null`` and read back as
NaN, the same way for every result type.
"""

from __future__ import annotations

import math


def json_float(x: float) -> float | None:
    """A float for strict JSON: NaN/inf become ``None`` (JSON has no NaN)."""
    return float(x) if math.isfinite(x) else None


def from_json_float(x: float | None) -> float:
    """``None`` (JSON's null) back to NaN."""
    return math.nan if x is None else float(x)
