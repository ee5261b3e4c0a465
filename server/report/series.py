"""The report's curves as data: per-site and aggregate series over the rounds, in panels.

Pure data from the run files (no matplotlib): which lines each panel of a figure has, with
their labels, values and marker, and the axis titles. ``report.plots`` draws them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from fedpath.server.run_files import RoundRecord, RunFiles

SITE_MARKERS = "osD^vP*X"
"""A marker shape per site as well as a colour, so sites with equal values stay visible."""

ROUND_AXIS = "federated round (no.)"
TRAIN_LOSS_AXIS = "training loss (mean per slide)"
VAL_LOSS_AXIS = "validation loss (slide cross-entropy, nats)"
SLIDE_AUC_AXIS = "validation slide AUC (0–1)"
PATCH_AUC_AXIS = "validation patch AUC (0–1)"
EPSILON_AXIS = "cumulative ε (dimensionless)"
WEIGHT_AXIS = "aggregation weight (share, 0–1)"
"""Axis titles with their unit (or scale, for a unitless number): a plot mailed on its own or
pasted into a slide still says what it shows."""

GLOBAL_LABEL = "all sites (server aggregate)"
GLOBAL_MODEL = "global model evaluated at each site"
LOCAL_MODEL = "each site's model after its local training"


@dataclass(frozen=True)
class Series:
    """One line of a panel: a site's values (or, with ``site`` None, the server's aggregate)
    over the rounds; NaN where there is no value that round."""

    label: str
    values: list[float]
    site: str | None
    marker: str = "o"

    @property
    def is_global(self) -> bool:
        return self.site is None


@dataclass(frozen=True)
class Panel:
    """One axes of a line figure: a title, a y label and its lines."""

    title: str
    ylabel: str
    series: list[Series]


def rounds_for_plots(run: RunFiles) -> list[RoundRecord]:
    """One record per round number, in round order; a round written twice keeps its last line.

    A round appears twice only when a run was resumed and redid a round; the later line is the
    one whose weights the following rounds built on.
    """
    by_round: dict[int, RoundRecord] = {}
    for record in run.rounds:
        by_round[record.round] = record
    return [by_round[k] for k in sorted(by_round)]


def _finite(value: float | None) -> float:
    """``None`` as NaN, which matplotlib draws as a gap."""
    return math.nan if value is None else float(value)


def site_series(
    rounds: Sequence[RoundRecord], site: str, get: Callable[[RoundRecord, str], float | None]
) -> list[float]:
    """``get(record, site)`` for each round, NaN where the site has no value that round."""
    return [_finite(get(record, site)) for record in rounds]


def _train_value(name: str) -> Callable[[RoundRecord, str], float | None]:
    def get(record: RoundRecord, site: str) -> float | None:
        metrics = record.train.get(site)
        return None if metrics is None else getattr(metrics, name)

    return get


def _eval_value(name: str) -> Callable[[RoundRecord, str], float | None]:
    def get(record: RoundRecord, site: str) -> float | None:
        metrics = record.evaluate.get(site)
        return None if metrics is None else getattr(metrics, name)

    return get


def _epsilon(record: RoundRecord, site: str) -> float | None:
    spent = record.privacy.get(site)
    return None if spent is None else spent.epsilon


def _has_values(values: Iterable[float]) -> bool:
    return any(math.isfinite(v) for v in values)


def _site_lines(
    rounds: Sequence[RoundRecord],
    sites: Sequence[str],
    get: Callable[[RoundRecord, str], float | None],
) -> list[Series]:
    lines = [
        Series(s, site_series(rounds, s, get), s, SITE_MARKERS[i % len(SITE_MARKERS)])
        for i, s in enumerate(sites)
    ]
    return [line for line in lines if _has_values(line.values)]


def _global_line(rounds: Sequence[RoundRecord], name: str) -> list[Series]:
    values = [_finite(getattr(r.global_, name)) for r in rounds]
    if not _has_values(values):
        return []
    return [Series(GLOBAL_LABEL, values, None, "o")]


def _metric_row(
    metric: str,
    ylabel: str,
    rounds: Sequence[RoundRecord],
    sites: Sequence[str],
    *,
    global_key: str,
    evaluate_key: str | None,
    train_key: str,
) -> list[Panel]:
    """One metric: the global model at each site (with the aggregate), then the local models.

    The aggregate (``global`` in metrics.jsonl) is what the server pooled from the sites'
    evaluation of the global model, except for the training loss, which only local training
    has; it is drawn in the panel it belongs to.
    """
    local = _site_lines(rounds, sites, _train_value(train_key))
    aggregate = _global_line(rounds, global_key)
    if evaluate_key is None:
        return _panels(
            [Panel(f"{metric} of each site's local training", ylabel, aggregate + local)]
        )
    evaluated = _site_lines(rounds, sites, _eval_value(evaluate_key))
    return _panels(
        [
            Panel(f"{metric}: {GLOBAL_MODEL}", ylabel, aggregate + evaluated),
            Panel(f"{metric}: {LOCAL_MODEL}", ylabel, local),
        ]
    )


def _panels(candidates: Iterable[Panel]) -> list[Panel]:
    return [p for p in candidates if p.series]


def _rows(candidates: Iterable[list[Panel]]) -> list[list[Panel]]:
    return [row for row in candidates if row]


def loss_rows(rounds: Sequence[RoundRecord], sites: Sequence[str]) -> list[list[Panel]]:
    """Training loss (local training only), then validation loss (global and local models)."""
    return _rows(
        [
            _metric_row("last-epoch loss", TRAIN_LOSS_AXIS, rounds, sites,
                        global_key="train_loss", evaluate_key=None, train_key="train_loss"),
            _metric_row("loss", VAL_LOSS_AXIS, rounds, sites,
                        global_key="val_loss", evaluate_key="loss", train_key="val_loss"),
        ]
    )  # fmt: skip


def auc_rows(rounds: Sequence[RoundRecord], sites: Sequence[str]) -> list[list[Panel]]:
    """Validation slide AUC, then patch AUC (localisation), global and local models."""
    return _rows(
        [
            _metric_row("slide AUC", SLIDE_AUC_AXIS, rounds, sites,
                        global_key="val_auc", evaluate_key="auc", train_key="val_auc"),
            _metric_row("patch AUC", PATCH_AUC_AXIS, rounds, sites,
                        global_key="val_patch_auc", evaluate_key="patch_auc",
                        train_key="val_patch_auc"),
        ]
    )  # fmt: skip


def epsilon_rows(rounds: Sequence[RoundRecord], sites: Sequence[str]) -> list[list[Panel]]:
    """Cumulative ε per site; δ in the title when all sites share it, else in the legend."""
    deltas = {site: spent.delta for record in rounds for site, spent in record.privacy.items()}
    lines = _site_lines(rounds, sites, _epsilon)
    title = "privacy spent: cumulative ε per site"
    if len(set(deltas.values())) == 1:
        title += f" (δ = {next(iter(deltas.values())):.0e})"
    else:
        lines = [replace(s, label=f"{s.label} (δ = {deltas[s.label]:.0e})") for s in lines]
    return _rows([_panels([Panel(title, EPSILON_AXIS, lines)])])


def weights(rounds: Sequence[RoundRecord], site: str) -> list[float]:
    """The site's aggregation weight in each round (0 where it got none)."""
    return [r.weights.get(site, 0.0) for r in rounds]
