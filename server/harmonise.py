"""The harmonisation gate: every site must have prepared its slides the same way.

Features from different encoders, weights, resolutions or patch sizes live in different spaces;
averaging models trained on them produces a model that is wrong everywhere while every round
"succeeds". So before round 1 the server compares each site's ``site.json`` facts and refuses to
start, naming each disagreeing site and field. The reference value of a field is the one most
sites share (ties: the alphabetically first site's), so one odd site out is named as such.
The encoder is reported as one fact, by registry id with its weights hash and feature width
("b: embedded with virchow2 (sha256 9f3a…, 2560-d), but a, c embedded with uni (...)"), which
is what a coordinator can act on; three lines about raw field values were not.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedpath.common.errors import FedpathError

__all__ = ["HARMONISED_FIELDS", "HarmonisationError", "SiteFacts", "check_harmonised"]

HARMONISED_FIELDS = ("encoder", "encoder_sha256", "feature_dim", "target_mpp", "patch_size")
"""Fields that must be identical at every site."""

_ENCODER_FIELDS = ("encoder", "encoder_sha256", "feature_dim")
"""Compared together and reported as one encoder description per site."""


class HarmonisationError(FedpathError):
    """Sites prepared their data incompatibly; ``problems`` has one line per site and field."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"the sites' prepared data do not match ({len(self.problems)} problem(s)); "
            f"the run was not started:\n{lines}"
        )


@dataclass(frozen=True)
class SiteFacts:
    """What a site reports about its prepared data: aggregate facts only, no slide ids."""

    site: str
    facts: Mapping[str, Any]

    @property
    def usable_slides(self) -> int:
        slides = self.facts.get("slides")
        return int(slides.get("usable", 0)) if isinstance(slides, Mapping) else 0


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "…" + text[-3:]


def _encoder(facts: Mapping[str, Any]) -> str:
    """``uni (sha256 ab12cd34…, 1024-d)``: the registry id, the weights hash, the width."""
    name = facts.get("encoder")
    digest = facts.get("encoder_sha256")
    dim = facts.get("feature_dim")
    parts = [f"sha256 {digest[:8]}…" if isinstance(digest, str) and digest else "no sha256"]
    if dim is not None:
        parts.append(f"{dim}-d")
    return f"{name if name else 'an unnamed encoder'} ({', '.join(parts)})"


def _encoder_problems(sites: Sequence[SiteFacts]) -> list[str]:
    values = {s.site: tuple(s.facts.get(f) for f in _ENCODER_FIELDS) for s in sites}
    ref = _reference(values)
    agreeing = sorted(site for site, v in values.items() if v == ref)
    facts = {s.site: s.facts for s in sites}
    problems = []
    for site in sorted(values):
        if values[site] == ref:
            continue
        same_id = values[site][0] == ref[0]
        why = (
            ": the same encoder with other weights (another download or version of the file?)"
            if same_id and values[site][1] != ref[1]
            else ""
        )
        problems.append(
            f"{site}: embedded with {_encoder(facts[site])}, but {', '.join(agreeing)} "
            f"embedded with {_encoder(facts[agreeing[0]])}{why}"
        )
    return problems


def _reference(values: Mapping[str, Any]) -> Any:
    counts = Counter(repr(v) for v in values.values())
    best = max(counts.values())
    for site in sorted(values):
        if counts[repr(values[site])] == best:
            return values[site]
    raise AssertionError("unreachable: values is not empty")


def check_harmonised(sites: Sequence[SiteFacts], labels: Sequence[str]) -> None:
    """Raise :class:`HarmonisationError` listing every mismatch; return when all agree.

    Also checked: each site's label vocabulary equals the run's (label order defines the class
    index of the shared classifier) and each site has at least one usable slide.
    """
    if not sites:
        raise HarmonisationError(["no site answered the harmonisation query"])
    problems: list[str] = []
    names = [s.site for s in sites]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{name}: more than one connected node calls itself {name!r}")
    problems += _encoder_problems(sites)
    for field in HARMONISED_FIELDS:
        if field in _ENCODER_FIELDS:
            continue
        values = {s.site: s.facts.get(field) for s in sites}
        ref = _reference(values)
        agreeing = sorted(site for site, v in values.items() if v == ref)
        for site in sorted(values):
            if values[site] != ref:
                problems.append(
                    f"{site}: {field} is {_show(values[site])}, but {', '.join(agreeing)} "
                    f"{'has' if len(agreeing) == 1 else 'have'} {_show(ref)}"
                )
    for s in sorted(sites, key=lambda s: s.site):
        site_labels = s.facts.get("labels")
        if list(site_labels or []) != list(labels):
            problems.append(f"{s.site}: labels are {site_labels}, the run uses {list(labels)}")
        if s.usable_slides < 1:
            problems.append(f"{s.site}: has no usable prepared slides")
    if problems:
        raise HarmonisationError(problems)
