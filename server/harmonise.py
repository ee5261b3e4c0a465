"""The harmonisation gate: every site must have prepared its slides the same way.

Features from different encoders, weights, resolutions or patch sizes live in different spaces;
averaging models trained on them produces a model that is wrong everywhere while every round
"succeeds". So before round 1 the server compares each site's ``site.json`` facts and refuses to
start, naming each disagreeing site and field. The reference value of a field is the one most
sites share (ties: the alphabetically first site's), so one odd site out is named as such.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.errors import FedpathError

__all__ = ["HARMONISED_FIELDS", "HarmonisationError", "SiteFacts", "check_harmonised"]

HARMONISED_FIELDS = ("encoder", "encoder_sha256", "feature_dim", "target_mpp", "patch_size")
"""Fields that must be identical at every site."""


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
    for field in HARMONISED_FIELDS:
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
