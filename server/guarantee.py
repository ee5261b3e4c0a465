"""Which differential-privacy guarantee a run has, in words and as a record (DESIGN §4.5).

A hospital's ethics board signs off on a sentence, so ``config.json`` and ``final.json`` carry
one (``privacy_guarantee``) next to a structured ``privacy`` record with the numbers and the
accountant. There are two independent mechanisms and so four answers:

* slide-level DP-SGD at each site (ε per site, one slide = one privacy unit), which each
  hospital runs and accounts itself and reports with every training reply;
* client-level DP at the server (ε for the federation, one site = one privacy unit,
  ``fedpath.server.client_dp``);
* both, or none.

The slide-level part of ``final.json`` is decided from what the sites actually reported, not
from what was asked of them: a site that trained a round without reporting an ε gave no
slide-level guarantee for that round, whatever the configuration said. Pure functions on
plain data, so the report and the tests need neither Flower nor Opacus.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BOTH",
    "CLIENT_LEVEL",
    "NONE",
    "SLIDE_LEVEL",
    "ClientLevelSpent",
    "planned_guarantee",
    "run_guarantee",
]

NONE = "none"
SLIDE_LEVEL = "slide-level DP-SGD at each site (ε per site)"
CLIENT_LEVEL = "client-level DP (ε for the federation, sites as privacy unit)"
BOTH = "both"

CLIENT_MECHANISM = (
    "each site's model update (local − global, one flat vector) clipped to L2 norm C at the "
    "server; Gaussian noise of std σ·C·max wᵢ added to every aggregate"
)
CLIENT_ACCOUNTANT = (
    "Opacus RDPAccountant, one Gaussian release per aggregated round, no amplification by "
    "site sampling (the sites of a round follow the run's public seed)"
)
CLIENT_SCOPE = (
    "neighbouring federations differ in one site's update, with the aggregation weights "
    "fixed; not covered: the coordinator sees every site's unnoised update (it must be "
    "trusted), and the per-site metrics and aggregation weights are sent without noise"
)
SLIDE_ACCOUNTANT = "each site's own DP-SGD accountant, as the site reported it"


@dataclass(frozen=True)
class ClientLevelSpent:
    """The client-level mechanism's settings and what it spent (``releases`` rounds)."""

    clip_norm: float
    noise_multiplier: float
    delta: float
    epsilon: float
    releases: int

    def record(self) -> dict[str, Any]:
        return {
            "mechanism": CLIENT_MECHANISM,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "rounds": self.releases,
            "accountant": CLIENT_ACCOUNTANT,
            "scope": CLIENT_SCOPE,
        }

    def sentence(self, *, planned: bool) -> str:
        when = (
            f"ε = {self.epsilon:.3g} at δ = {self.delta:g} once all {self.releases} round(s) "
            "are aggregated"
            if planned
            else f"ε = {self.epsilon:.3g} at δ = {self.delta:g} after {self.releases} "
            "aggregated round(s)"
        )
        return (
            f"{CLIENT_LEVEL}: {when}; {CLIENT_MECHANISM} (C = {self.clip_norm:g}, "
            f"σ = {self.noise_multiplier:g}); accountant: {CLIENT_ACCOUNTANT}; {CLIENT_SCOPE}"
        )


def _kind(slide: bool, client: bool) -> str:
    if slide and client:
        return BOTH
    return SLIDE_LEVEL if slide else CLIENT_LEVEL if client else NONE


def planned_guarantee(
    client: ClientLevelSpent | None, slide_level: bool | None = None
) -> dict[str, Any]:
    """``config.json``'s statement when the run starts.

    ``client`` carries the ε the configured rounds will spend. ``slide_level`` is ``None``
    when the run config does not decide it (each hospital runs DP-SGD or not): then the
    statement says so and ``final.json`` gives the guarantee the sites actually delivered.
    """
    parts: list[str] = []
    if slide_level is True:
        parts.append(f"{SLIDE_LEVEL}, counted by {SLIDE_ACCOUNTANT}")
    if client is not None:
        parts.append(client.sentence(planned=True))
    else:
        parts.append("no client-level DP: model updates are aggregated without clipping or noise")
    if slide_level is None:
        parts.append(
            "slide-level DP-SGD is each site's: a site that runs it reports its ε every round, "
            "and final.json states whether every site did"
        )
    elif slide_level is False:
        parts.append("no slide-level DP-SGD at the sites")
    kind = _kind(bool(slide_level), client is not None)
    prefix = "planned: " if kind != NONE else "none planned by the run config: "
    return {
        "privacy_guarantee": prefix + "; ".join(parts),
        "privacy": {
            "guarantee": kind,
            "client_level": client.record() if client is not None else None,
            "site_dp_sgd": (
                "decided by each site (final.json states what they reported)"
                if slide_level is None
                else "planned"
                if slide_level
                else "off"
            ),
        },
    }


def _slide_level(
    rounds: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """(latest (ε, δ) of every site, sites that trained a round without reporting an ε)."""
    latest: dict[str, tuple[float, float]] = {}
    without: set[str] = set()
    for record in rounds:
        privacy = record.get("privacy") or {}
        for site in record.get("replied") or []:
            spent = privacy.get(site)
            eps = None if spent is None else spent.get("epsilon")
            if eps is None or not math.isfinite(float(eps)):
                without.add(site)
            else:
                latest[site] = (float(eps), float(spent["delta"]))
    return latest, sorted(without)


def run_guarantee(
    rounds: Sequence[Mapping[str, Any]], client: ClientLevelSpent | None
) -> dict[str, Any]:
    """``final.json``'s statement: the guarantee of the rounds that were aggregated.

    ``rounds`` are the ``metrics.jsonl`` records; ``client`` is the client-level accountant's
    state after them (``None`` when client-level DP was off).
    """
    latest, without = _slide_level(rounds)
    slide = bool(latest) and not without
    if client is not None and client.releases == 0:
        client_part = f"{CLIENT_LEVEL} was on, but no round was aggregated, so nothing was released"
    elif client is not None:
        client_part = client.sentence(planned=False)
    else:
        client_part = ""
    parts: list[str] = []
    if slide:
        per_site = ", ".join(f"{s} ε = {e:.3g} (δ = {d:g})" for s, (e, d) in sorted(latest.items()))
        parts.append(f"{SLIDE_LEVEL}: {per_site}, counted by {SLIDE_ACCOUNTANT}")
    elif latest:
        parts.append(
            "no slide-level guarantee for the run: DP-SGD ε was reported by "
            f"{', '.join(sorted(latest))} but not by {', '.join(without)} in every round it trained"
        )
    if client_part:
        parts.append(client_part)
    kind = _kind(slide, client is not None and client.releases > 0)
    if kind == NONE and not parts:
        parts.append(
            "no differential privacy in this run: model updates were aggregated without "
            "clipping or noise and no site reported a DP-SGD ε"
        )
    prefix = "both: " if kind == BOTH else "none: " if kind == NONE else ""
    return {
        "privacy_guarantee": prefix + "; ".join(parts),
        "privacy": {
            "guarantee": kind,
            "client_level": client.record() if client is not None else None,
            "site_dp_sgd": (
                {
                    "sites": {s: {"epsilon": e, "delta": d} for s, (e, d) in latest.items()},
                    "sites_without_epsilon": without,
                    "accountant": SLIDE_ACCOUNTANT,
                }
                if latest
                else None
            ),
        },
    }
