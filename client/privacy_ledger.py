"""The hospital's privacy ledger: every DP-SGD round ever trained on its slides, on its disk.

Each Flower message runs the ClientApp in a fresh process, and a run can be resumed by a new
``flwr run`` after a coordinator restart, so the accountant's history cannot live in memory.
It is kept twice: in the run's ``Context.state`` (Flower keeps it with the SuperNode for the
run) and in ``privacy-ledger.json`` in the site's data directory, which also outlives runs and
sums the privacy spent on the same data across all of them. The two are merged on every
message, so losing either one (a restarted SuperNode, a ledger restored from an old backup)
loses no history.

What is recorded, per **dataset** (the prepared data: feature config + its slides), is one
entry per trained round: the run, the round, a hash of what the site was asked to train (the
global model and the instructions), and the mechanism ``(σ, q, steps)`` with its δ. An entry
is written *before* training starts (a reservation), so a crash mid-round can only over-count.
A round asked again with the same key (a retry, or the same round re-run after a resume from
the same checkpoint) trains again from the same secret seed and therefore releases exactly
the same update, which costs no further privacy: it is not counted twice. A round asked again
with a *different* model is a new release and gets its own entry.

Lifetime ε of a dataset composes (RDP) the entries of every dataset that shares a slide with
it: re-preparing the same slides with another encoder, or adding slides, changes the dataset's
identity but not the privacy already spent on its slides.

The ledger holds a random secret from which the rounds' sampling and noise seeds are derived;
it never leaves the hospital (``fedpath privacy`` does not print it), because noise that the
server could regenerate would protect nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import Timeout

from fedpath.client.site_facts import read_site
from fedpath.client.training.privacy_accountant import Mechanism, epsilon
from fedpath.common.atomic import atomic_write_json
from fedpath.common.dp_config import PRIVACY_UNIT
from fedpath.common.errors import ConfigError, FedpathError
from fedpath.common.locking import kernel_lock

__all__ = [
    "LEDGER_FILE",
    "LIFETIME_ACCOUNTANT",
    "STATE_KEY",
    "BudgetExhausted",
    "DatasetRecord",
    "LedgerEntry",
    "NodeBudget",
    "PrivacyLedger",
    "Reservation",
    "dataset_identity",
    "entries_from_state",
    "entries_to_state",
    "reserve_round",
    "run_epsilon",
    "summarise",
]

LEDGER_FILE = "privacy-ledger.json"
LOCK_FILE = ".privacy-ledger.lock"
FORMAT = "fedpath-privacy-ledger/1"
STATE_KEY = "fedpath.privacy"
"""The ``Context.state`` record that carries this run's ledger entries between messages."""
LIFETIME_ACCOUNTANT = "rdp"
"""Lifetime ε composes runs that may have used different accountants; RDP composes any
(σ, q, steps) history, so the budget is always checked with it."""
LOCK_TIMEOUT = 60.0


class BudgetExhausted(FedpathError):
    """Training this round would take the dataset's lifetime ε past the hospital's budget."""

    def __init__(
        self,
        lifetime: float,
        would_be: float,
        budget: float,
        delta: float,
        run_entries: Sequence[LedgerEntry] = (),
    ) -> None:
        self.lifetime = lifetime
        self.would_be = would_be
        self.budget = budget
        self.delta = delta
        self.run_entries = list(run_entries)
        """The run's entries so far (what the site has spent in this run)."""
        super().__init__(
            f"privacy budget exhausted: this round would bring the data's lifetime ε from "
            f"{lifetime:.3f} to {would_be:.3f} (δ = {delta:g}), above the budget of "
            f"{budget:g} (privacy-budget in the node config)"
        )


@dataclass(frozen=True)
class NodeBudget:
    """The hospital's lifetime budget from its SuperNode's node config (both optional).

    ``privacy-budget`` is the lifetime ε allowed per dataset; ``privacy-delta`` the δ at which
    it is counted (default: the run's δ). A site with a budget refuses non-private training.
    """

    epsilon: float | None = None
    delta: float | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeBudget:
        """Validate ``privacy-budget`` (> 0) and ``privacy-delta`` (0 < δ < 1); ConfigError."""
        values: dict[str, float | None] = {}
        for key in ("privacy-budget", "privacy-delta"):
            raw = node_config.get(key)
            if raw is None or raw == "":
                values[key] = None
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"node config {key} must be a number, got {raw!r}") from None
            if isinstance(raw, bool) or not math.isfinite(value):
                raise ConfigError(f"node config {key} must be a finite number, got {raw!r}")
            values[key] = value
        budget, delta = values["privacy-budget"], values["privacy-delta"]
        if budget is not None and budget <= 0:
            raise ConfigError(f"node config privacy-budget must be > 0, got {budget:g}")
        if delta is not None and not 0 < delta < 1:
            raise ConfigError(f"node config privacy-delta must be in (0, 1), got {delta:g}")
        return cls(epsilon=budget, delta=delta)


@dataclass(frozen=True)
class LedgerEntry:
    """One trained round: who asked (run, round, input), what it cost (σ, q, steps at δ)."""

    run: str
    round: int
    input_sha256: str
    site: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float
    accountant: str
    n_slides: int
    recorded: str = ""
    privacy_unit: str = PRIVACY_UNIT

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.run, self.round, self.input_sha256)

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> LedgerEntry:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a ledger entry must be an object")
        try:
            return cls(
                run=str(data["run"]),
                round=int(data["round"]),
                input_sha256=str(data["input_sha256"]),
                site=str(data.get("site", "")),
                noise_multiplier=float(data["noise_multiplier"]),
                sample_rate=float(data["sample_rate"]),
                steps=int(data["steps"]),
                delta=float(data["delta"]),
                max_grad_norm=float(data.get("max_grad_norm", math.nan)),
                accountant=str(data.get("accountant", LIFETIME_ACCOUNTANT)),
                n_slides=int(data.get("n_slides", 0)),
                recorded=str(data.get("recorded", "")),
                privacy_unit=str(data.get("privacy_unit", PRIVACY_UNIT)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: malformed ledger entry ({exc})") from exc


@dataclass
class DatasetRecord:
    """One dataset's slides (as hashes), the budget last configured for it, and its entries."""

    dataset_id: str
    slides: frozenset[str]
    first_seen: str
    entries: list[LedgerEntry] = field(default_factory=list)
    budget_epsilon: float | None = None
    budget_delta: float | None = None

    def runs(self) -> list[str]:
        return list(dict.fromkeys(e.run for e in self.entries))

    def run_entries(self, run: str) -> list[LedgerEntry]:
        return [e for e in self.entries if e.run == run]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _slide_hash(slide_id: str) -> str:
    return hashlib.sha256(slide_id.encode("utf-8")).hexdigest()[:16]


def dataset_identity(data_dir: Path, slide_ids: Sequence[str]) -> tuple[str, frozenset[str]]:
    """``(dataset id, slide hashes)`` of a prepared site.

    The id hashes what makes the data what it is: the feature extraction (encoder weights,
    preparation config, resolution, patch size, labels; from ``site.json``, leaving out
    timestamps) and the set of slides. Slide ids are stored hashed: the ledger never needs
    them in clear, only to tell whether two datasets share a slide.
    """
    site = read_site(data_dir)
    facts = {
        key: site.get(key)
        for key in (
            "encoder",
            "encoder_sha256",
            "config_sha256",
            "feature_dim",
            "target_mpp",
            "patch_size",
            "labels",
        )
    }
    slides = sorted({_slide_hash(s) for s in slide_ids})
    digest = hashlib.sha256(
        json.dumps({"site": facts, "slides": slides}, sort_keys=True).encode("utf-8")
    ).hexdigest()
    return digest[:16], frozenset(slides)


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    """Exclusive lock on the ledger, waiting up to ``LOCK_TIMEOUT`` s (two runs on one site)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = kernel_lock(data_dir / LOCK_FILE, timeout=LOCK_TIMEOUT, mode=0o600)
    try:
        lock.acquire()
    except Timeout:
        raise FedpathError(
            f"{data_dir / LEDGER_FILE} stayed locked by another fedpath process "
            f"for {LOCK_TIMEOUT:.0f} s"
        ) from None
    try:
        yield
    finally:
        lock.release()


class PrivacyLedger:
    """The ledger file's content; :meth:`load` and :meth:`save` are the only I/O."""

    def __init__(self, path: Path, secret: str, datasets: dict[str, DatasetRecord]) -> None:
        self.path = path
        self.secret = secret
        self.datasets = datasets

    @classmethod
    def load(cls, data_dir: Path) -> PrivacyLedger:
        """The ledger of ``data_dir`` (a new, empty one if there is none yet)."""
        path = data_dir / LEDGER_FILE
        if not path.exists():
            return cls(path, secrets.token_hex(32), {})
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: the privacy ledger cannot be read ({exc})") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ConfigError(f"{path}: not a fedpath privacy ledger (format {FORMAT})")
        secret = raw.get("secret")
        if not isinstance(secret, str) or len(secret) < 32:
            raise ConfigError(f"{path}: the ledger has no secret")
        datasets: dict[str, DatasetRecord] = {}
        for dataset_id, data in (raw.get("datasets") or {}).items():
            where = f"{path}: dataset {dataset_id}"
            if not isinstance(data, dict):
                raise ConfigError(f"{where}: must be an object")
            budget = data.get("budget") or {}
            datasets[str(dataset_id)] = DatasetRecord(
                dataset_id=str(dataset_id),
                slides=frozenset(str(s) for s in data.get("slides", [])),
                first_seen=str(data.get("first_seen", "")),
                entries=[LedgerEntry.from_json(e, where) for e in data.get("entries", [])],
                budget_epsilon=budget.get("epsilon"),
                budget_delta=budget.get("delta"),
            )
        return cls(path, secret, datasets)

    def save(self) -> None:
        atomic_write_json(
            self.path,
            {
                "format": FORMAT,
                "secret": self.secret,
                "datasets": {
                    d.dataset_id: {
                        "slides": sorted(d.slides),
                        "first_seen": d.first_seen,
                        "budget": {"epsilon": d.budget_epsilon, "delta": d.budget_delta},
                        "entries": [e.to_json() for e in d.entries],
                    }
                    for d in self.datasets.values()
                },
            },
        )

    def dataset(self, dataset_id: str, slides: frozenset[str]) -> DatasetRecord:
        """The record of ``dataset_id``, created on first use."""
        record = self.datasets.get(dataset_id)
        if record is None:
            record = DatasetRecord(dataset_id, slides, _now())
            self.datasets[dataset_id] = record
        return record

    def related(self, dataset_id: str) -> list[DatasetRecord]:
        """``dataset_id`` and every dataset sharing at least one slide with it."""
        own = self.datasets[dataset_id]
        return [d for d in self.datasets.values() if d is own or d.slides & own.slides]

    def lifetime_history(self, dataset_id: str) -> list[Mechanism]:
        return [e.mechanism for d in self.related(dataset_id) for e in d.entries]

    def lifetime_epsilon(self, dataset_id: str, delta: float) -> float:
        return epsilon(self.lifetime_history(dataset_id), delta, LIFETIME_ACCOUNTANT)

    def seed_for(self, key: tuple[str, int, str]) -> int:
        """The secret 64-bit seed of one round's sampling and noise: the same key, the same
        seed, so a retried round releases the identical update."""
        text = "\x00".join([self.secret, key[0], str(key[1]), key[2]])
        return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def run_epsilon(entries: Sequence[LedgerEntry]) -> tuple[float, float]:
    """(ε, δ) of one run's entries, with the run's own accountant and δ."""
    if not entries:
        return 0.0, math.nan
    delta = entries[-1].delta
    accountant = entries[-1].accountant
    name = accountant if accountant in ("rdp", "prv") else LIFETIME_ACCOUNTANT
    return epsilon([e.mechanism for e in entries], delta, name), delta  # type: ignore[arg-type]


@dataclass(frozen=True)
class Reservation:
    """The outcome of :func:`reserve_round` for a round that may be trained."""

    entry: LedgerEntry
    already_recorded: bool
    secret_seed: int
    run_entries: list[LedgerEntry]
    """This run's entries on the dataset, this round included (for ``Context.state``)."""
    run_epsilon: float


def _merge(record: DatasetRecord, carried: Sequence[LedgerEntry]) -> bool:
    known = {e.key for e in record.entries}
    added = [e for e in carried if e.key not in known]
    record.entries.extend(added)
    return bool(added)


def reserve_round(
    data_dir: Path,
    dataset_id: str,
    slides: frozenset[str],
    entry: LedgerEntry,
    budget: NodeBudget,
    carried: Sequence[LedgerEntry] = (),
) -> Reservation:
    """Record ``entry`` before its round is trained, unless that would exceed the budget.

    ``carried`` are the run's entries from ``Context.state``; any the ledger lacks are put
    back first. Raises :class:`BudgetExhausted` (after saving the merge) when the dataset's
    lifetime ε with this round would exceed ``budget.epsilon``; then nothing is trained.
    """
    with _locked(data_dir):
        ledger = PrivacyLedger.load(data_dir)
        record = ledger.dataset(dataset_id, slides)
        changed = _merge(record, carried) or not ledger.path.exists()
        if budget.epsilon is not None:
            changed = changed or (record.budget_epsilon, record.budget_delta) != (
                budget.epsilon,
                budget.delta,
            )
            record.budget_epsilon, record.budget_delta = budget.epsilon, budget.delta
        delta = budget.delta if budget.delta is not None else entry.delta
        existing = next((e for e in record.entries if e.key == entry.key), None)
        already = existing is not None
        if existing is None:
            history = [*ledger.lifetime_history(dataset_id), entry.mechanism]
            would_be = epsilon(history, delta, LIFETIME_ACCOUNTANT)
            if budget.epsilon is not None and would_be > budget.epsilon:
                if changed:
                    ledger.save()
                lifetime = ledger.lifetime_epsilon(dataset_id, delta)
                raise BudgetExhausted(
                    lifetime, would_be, budget.epsilon, delta, record.run_entries(entry.run)
                )
            existing = LedgerEntry(**{**entry.to_json(), "recorded": _now()})
            record.entries.append(existing)
            changed = True
        if changed:
            ledger.save()
        entries = record.run_entries(entry.run)
        return Reservation(
            entry=existing,
            already_recorded=already,
            secret_seed=ledger.seed_for(entry.key),
            run_entries=entries,
            run_epsilon=run_epsilon(entries)[0],
        )


def entries_from_state(state: Any, dataset_id: str) -> list[LedgerEntry]:
    """This run's entries for ``dataset_id`` kept in a Flower ``Context.state`` RecordDict."""
    record = state.config_records.get(STATE_KEY) if hasattr(state, "config_records") else None
    if record is None:
        return []
    raw = record.get(dataset_id)
    if not isinstance(raw, str):
        return []
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"Context.state {STATE_KEY}: not JSON ({exc})") from exc
    return [LedgerEntry.from_json(e, f"Context.state {STATE_KEY}") for e in data]


def entries_to_state(state: Any, dataset_id: str, entries: Sequence[LedgerEntry]) -> None:
    """Store this run's entries for ``dataset_id`` in ``Context.state`` (replacing them)."""
    from flwr.app import ConfigRecord

    existing = state.config_records.get(STATE_KEY)
    values = dict(existing) if existing is not None else {}
    values[dataset_id] = json.dumps([e.to_json() for e in entries], sort_keys=True)
    state[STATE_KEY] = ConfigRecord(values)


@dataclass(frozen=True)
class RunSummary:
    """One run on one dataset as ``fedpath privacy`` shows it."""

    run: str
    site: str
    rounds: int
    releases: int
    epsilon: float
    delta: float
    accountant: str
    last_recorded: str


@dataclass(frozen=True)
class DatasetSummary:
    """One dataset: its runs, lifetime ε (RDP over every run touching its slides), budget."""

    dataset_id: str
    n_slides: int
    first_seen: str
    runs: list[RunSummary]
    lifetime_epsilon: float
    lifetime_delta: float | None
    budget_epsilon: float | None
    shares_slides_with: list[str]

    @property
    def budget_left(self) -> float | None:
        if self.budget_epsilon is None:
            return None
        return max(0.0, self.budget_epsilon - self.lifetime_epsilon)


def summarise(data_dir: Path) -> list[DatasetSummary]:
    """Every dataset of ``data_dir``'s ledger (``ConfigError`` when there is no ledger).

    Lifetime ε is counted at the budget's δ when one was configured, else at the δ of the
    dataset's latest entry (``None`` when it has no entry yet).
    """
    path = data_dir / LEDGER_FILE
    if not path.is_file():
        raise ConfigError(
            f"{data_dir} has no privacy ledger ({LEDGER_FILE}): no DP-SGD round was trained "
            "on this data yet"
        )
    ledger = PrivacyLedger.load(data_dir)
    out: list[DatasetSummary] = []
    for record in ledger.datasets.values():
        runs = []
        for run in record.runs():
            entries = record.run_entries(run)
            eps, delta = run_epsilon(entries)
            runs.append(
                RunSummary(
                    run=run,
                    site=entries[-1].site,
                    rounds=len({e.round for e in entries}),
                    releases=len(entries),
                    epsilon=eps,
                    delta=delta,
                    accountant=entries[-1].accountant,
                    last_recorded=max(e.recorded for e in entries),
                )
            )
        delta = record.budget_delta
        if delta is None and record.entries:
            delta = record.entries[-1].delta
        lifetime = ledger.lifetime_epsilon(record.dataset_id, delta) if delta else 0.0
        others = [d.dataset_id for d in ledger.related(record.dataset_id) if d is not record]
        out.append(
            DatasetSummary(
                dataset_id=record.dataset_id,
                n_slides=len(record.slides),
                first_seen=record.first_seen,
                runs=runs,
                lifetime_epsilon=lifetime,
                lifetime_delta=delta,
                budget_epsilon=record.budget_epsilon,
                shares_slides_with=others,
            )
        )
    return out
