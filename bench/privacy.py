"""Privacy benchmark: what slide-level DP-SGD costs in time and in accuracy (issue 6, "Show").

Usage (from the repository root)::

    .venv/bin/python -m bench.privacy                  # full run, ~30-40 min on 2 shared cores
    .venv/bin/python -m bench.privacy --quick          # small cohorts, a smoke run
    .venv/bin/python -m bench.privacy --skip-timing    # only accuracy vs ε
    .venv/bin/python -m bench.privacy --seeds 1 --rounds 10 --epsilons 1,4,8,inf

(1) Seconds per epoch of the site-local trainer vs slide-level DP-SGD, interleaved
(``bench.privacy_timing``); target (issue 6): DP-SGD as shipped ≤ 2.5× slower. (2) Slide and
patch AUC at a target ε per site of 1, 4, 8 and ∞ on ``PRIVACY_COHORT``: real FedAvg
federations in-process (``bench.federate``) with DP-SGD at every site, beside the pooled
centralised private trainer at the same ε; target: at ε = 8 per site, federated slide AUC
within 0.05 of non-private. How and why: ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from bench.accuracy import train_config
from bench.cohorts import FULL_COHORT, PRIVACY_COHORT, QUICK_COHORT, TUMOUR, CohortSpec
from bench.feature_cohort import FULL, QUICK
from bench.federate import run_and_load
from bench.machine import machine
from bench.prepared_cohort import (
    LoadedCohort,
    PreparedCohort,
    build_cohort,
    describe,
    load_cohort,
    visible_annotations,
)
from bench.privacy_timing import main_timing
from bench.scoring import Evaluation, evaluate_bags
from bench.site_views import write_site_dirs
from fedpath.client.training.privacy_accountant import epsilon
from fedpath.client.training.private_trainer import (
    plan_private_training,
    train_private,
)
from fedpath.client.training.trainer import train
from fedpath.common.dp_config import DPConfig
from fedpath.common.mil.config import ModelConfig
from fedpath.common.mil.models import MILModel, build_model
from fedpath.common.train_config import TrainConfig

FEDERATED_SHARES = {"site_a": 0.3}
"""Issue 4's label layout: site A outlines 30 % of its training tumour slides; B and C none."""
NON_PRIVATE = math.inf
TARGET_GAP = 0.05
TARGET_EPSILON = 8.0
DP_LR = 1e-3
"""Learning rate of the accuracy-vs-ε arms, private and non-private alike (bench/README.md)."""

COHORTS = {"privacy": PRIVACY_COHORT, "accuracy": FULL_COHORT}
DEFAULT_BATCH = {"privacy": 16, "accuracy": 8, "quick": 8}
"""Expected Poisson batch per site: DESIGN §4.5's 16 where sites have 100-200 training slides;
8 on the accuracy cohort, whose smallest site has 14 (a batch of 16 would take it whole every
step, with no amplification by sampling)."""

Log = Callable[[str], None]


# ------------------------------------------------------------------- (2) accuracy vs ε


@dataclass(frozen=True)
class PrivacyArm:
    """How the arm trains (``fedavg`` or ``centralised``) and the target ε (∞: no DP)."""

    how: str
    epsilon: float

    @property
    def label(self) -> str:
        return f"{self.how} ε = {_eps(self.epsilon)}"


@dataclass(frozen=True)
class SitePrivacy:
    """What one site (or the pooled trainer) spent: reported ε and the accountant's."""

    n_train: int
    sigma: float
    reported: float
    planned: float


@dataclass(frozen=True)
class PrivacyResult:
    arm: PrivacyArm
    seed: int
    evaluation: Evaluation
    spent: Mapping[str, SitePrivacy] = field(default_factory=dict)
    seconds: float = 0.0


def _eps(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:g}"


def private_dp(target: float, batch: int, rounds: int) -> DPConfig:
    """The DP-SGD settings every site gets from ``dp-target-epsilon`` (shipped C, δ, RDP)."""
    return DPConfig(
        enabled=True, target_epsilon=target, expected_batch_slides=batch, planned_rounds=rounds
    )


def planned_epsilon(dp: DPConfig, n_train: int, epochs: int, rounds: int) -> SitePrivacy:
    """σ a site solves from the target and the accountant's ε of ``rounds`` such rounds."""
    plan = plan_private_training(dp, n_train, epochs)
    history = [plan] * rounds
    return SitePrivacy(
        n_train, plan.noise_multiplier, math.nan, epsilon(history, dp.delta, dp.accountant)
    )


def run_federated_arm(
    arm: PrivacyArm,
    seed: int,
    cohort: PreparedCohort,
    visible: frozenset[str],
    data: LoadedCohort,
    *,
    rounds: int,
    local_epochs: int,
    batch: int,
    lr: float,
    model: str = "clam_sb",
    hidden_dim: int = 512,
    supervision: str = "mixed",
) -> PrivacyResult:
    """One whole FedAvg run through the real round loop and ClientApps; final model scored."""
    with tempfile.TemporaryDirectory(prefix="fedpath-bench-privacy-") as tmp:
        sites = write_site_dirs(cohort, visible, Path(tmp) / "sites")
        run_config: dict[str, object] = {
            "num-server-rounds": rounds,
            "strategy": "fedavg",
            "model": model,
            "model-hidden-dim": hidden_dim,
            "supervision": supervision,
            "local-epochs": local_epochs,
            "lr": lr,
            "seed": seed,
            "min-sites": len(sites),
            "connect-timeout": 10.0,
            "runs-dir": str(Path(tmp) / "runs"),
            "run-name": "bench-privacy",
        }
        if math.isfinite(arm.epsilon):
            run_config.update({"dp-target-epsilon": arm.epsilon, "dp-batch-slides": batch})
        run = run_and_load(sites, run_config, cohort.feature_dim, f"{arm.label} seed {seed}")
    spent: dict[str, SitePrivacy] = {}
    if math.isfinite(arm.epsilon):
        dp = run.config.dp_config()
        reported = ((run.final.get("privacy") or {}).get("site_dp_sgd") or {}).get("sites") or {}
        for hospital in cohort.hospitals:
            plan = planned_epsilon(dp, len(hospital.train), local_epochs, rounds)
            value = reported.get(hospital.name, {}).get("epsilon", math.nan)
            spent[hospital.name] = replace(plan, reported=float(value))
    evaluation = evaluate_bags(run.model, data.test, seed=seed)
    return PrivacyResult(arm, seed, evaluation, spent, run.seconds)


def run_centralised_arm(
    arm: PrivacyArm,
    seed: int,
    data: LoadedCohort,
    feature_dim: int,
    *,
    epochs: int,
    batch: int,
    lr: float,
    model: str = "clam_sb",
    hidden_dim: int = 512,
    supervision: str = "mixed",
) -> PrivacyResult:
    """The pooled training slides, ``epochs`` epochs, private at ``arm.epsilon`` (or not).

    No validation bags are given (as in a federated round), so the final model is scored,
    like the federated arms' final round.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        shape = ModelConfig(kind=model, feature_dim=feature_dim, hidden_dim=hidden_dim)  # type: ignore[arg-type]
        net = build_model(shape)
    base = TrainConfig(epochs=epochs, min_epochs=0, patience=epochs + 1, lr=lr)
    cfg = train_config(base, supervision, seed)
    began = time.perf_counter()
    spent: dict[str, SitePrivacy] = {}
    trained: MILModel
    if math.isfinite(arm.epsilon):
        dp = private_dp(arm.epsilon, batch, rounds=1)
        private = train_private(net, data.train, [], cfg, dp)
        trained = private.result.model
        plan = planned_epsilon(dp, len(data.train), epochs, 1)
        reported = epsilon([private.mechanism], dp.delta, dp.accountant)
        spent["pooled"] = replace(plan, reported=reported)
    else:
        trained = train(net, data.train, [], cfg).model
    seconds = time.perf_counter() - began
    return PrivacyResult(arm, seed, evaluate_bags(trained, data.test, seed=seed), spent, seconds)


@dataclass(frozen=True)
class PrivacySummary:
    arm: PrivacyArm
    n_seeds: int
    slide_auc: tuple[float, float]
    slide_ci: tuple[float, float]
    patch_auc: tuple[float, float]
    sigma: Mapping[str, float]
    reported: Mapping[str, float]
    """Largest ε any seed's run reported, per site (or ``pooled``)."""
    seconds: float


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def summarise(results: Sequence[PrivacyResult]) -> list[PrivacySummary]:
    """One row per arm (over seeds), in the order the arms first appear."""
    out = []
    for arm in dict.fromkeys(r.arm for r in results):
        runs = [r for r in results if r.arm == arm]
        slides = [r.evaluation.slide.auc for r in runs]
        sites = list(runs[0].spent)
        out.append(
            PrivacySummary(
                arm=arm,
                n_seeds=len(runs),
                slide_auc=_mean_sd([m.value for m in slides]),
                slide_ci=(
                    statistics.median(m.low for m in slides),
                    statistics.median(m.high for m in slides),
                ),
                patch_auc=_mean_sd([r.evaluation.patch.auc for r in runs]),
                sigma={s: runs[0].spent[s].sigma for s in sites},
                reported={s: max(r.spent[s].reported for r in runs) for s in sites},
                seconds=statistics.fmean(r.seconds for r in runs),
            )
        )
    return out


def format_accuracy(summaries: Sequence[PrivacySummary]) -> str:
    """Markdown table: ε (target per site), AUCs, the σ each site solved and the ε reported."""
    lines = [
        "| training | target ε per site | seeds | slide AUC | slide AUC 95% CI | patch AUC "
        "| σ solved | ε reported | s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        sigma = ", ".join(f"{k} {v:.2f}" for k, v in s.sigma.items()) or "—"
        spent = ", ".join(f"{k} {v:.2f}" for k, v in s.reported.items()) or "—"
        lines.append(
            f"| {s.arm.how} | {_eps(s.arm.epsilon)} | {s.n_seeds} "
            f"| {s.slide_auc[0]:.4f} ± {s.slide_auc[1]:.4f} "
            f"| [{s.slide_ci[0]:.3f}, {s.slide_ci[1]:.3f}] "
            f"| {s.patch_auc[0]:.4f} ± {s.patch_auc[1]:.4f} | {sigma} | {spent} "
            f"| {s.seconds:.0f} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class GapCheck:
    how: str
    epsilon: float
    gap: float
    """Non-private minus private slide AUC (means over seeds)."""
    target: bool
    """Whether this ε is the one issue 6's target is stated for."""

    @property
    def met(self) -> bool:
        return self.gap <= TARGET_GAP


def check_gaps(summaries: Sequence[PrivacySummary]) -> list[GapCheck]:
    """Slide AUC lost to DP at every finite ε, per way of training (target: ≤ 0.05 at ε = 8)."""
    checks = []
    for how in dict.fromkeys(s.arm.how for s in summaries):
        rows = {s.arm.epsilon: s for s in summaries if s.arm.how == how}
        if NON_PRIVATE not in rows:
            continue
        reference = rows[NON_PRIVATE].slide_auc[0]
        for eps, s in sorted(rows.items()):
            if math.isfinite(eps):
                gap = reference - s.slide_auc[0]
                checks.append(GapCheck(how, eps, gap, math.isclose(eps, TARGET_EPSILON)))
    return checks


def privacy_lines(result: PrivacyResult) -> list[str]:
    """Per site: training slides, σ solved, ε reported by the run vs the accountant's plan."""
    return [
        f"      {site}: {p.n_train} training slides, σ {p.sigma:.3f}, ε reported "
        f"{p.reported:.3f} (accountant for the plan {p.planned:.3f})"
        for site, p in result.spent.items()
    ]


# ----------------------------------------------------------------------------------- main


def main_accuracy(
    spec: CohortSpec,
    epsilons: Sequence[float],
    n_seeds: int,
    rounds: int,
    local_epochs: int,
    batch: int,
    centralised: bool,
    hidden_dim: int = 512,
    lr: float | None = None,
) -> list[PrivacySummary]:
    cohort = build_cohort(spec, log=print)
    visible = visible_annotations(cohort, FEDERATED_SHARES, spec.seed)
    base = TrainConfig() if lr is None else TrainConfig(lr=lr)
    print(
        f"\n## (2) accuracy vs ε: cohort {spec.synth_key()} ({spec.encoder}, "
        f"{cohort.feature_dim}-d), label layout {FEDERATED_SHARES} (others: slide labels only)"
    )
    for line in describe(cohort, visible):
        print(line)
    print(
        f"federated: FedAvg, clam_sb (hidden width {hidden_dim}), mixed supervision, "
        f"{rounds} rounds × {local_epochs} local epoch(s), lr {base.lr:g}, all "
        f"{len(cohort.hospitals)} sites every round, final round scored; DP-SGD per site: "
        f"dp-target-epsilon, σ solved for {rounds} rounds, expected batch {batch} slides, "
        f"C 1, δ 1e-5, RDP; centralised: the pooled training slides, "
        f"{rounds * local_epochs} epochs, same DP settings; {n_seeds} seed(s)",
        flush=True,
    )
    data = load_cohort(cohort, visible)
    tumour = sum(b.entry.label == TUMOUR for b in data.test)
    arms = [PrivacyArm("fedavg", e) for e in epsilons]
    if centralised:
        arms += [PrivacyArm("centralised", e) for e in epsilons]
    results = []
    for arm in arms:
        for seed in range(n_seeds):
            if arm.how == "fedavg":
                result = run_federated_arm(
                    arm,
                    seed,
                    cohort,
                    visible,
                    data,
                    rounds=rounds,
                    local_epochs=local_epochs,
                    batch=batch,
                    lr=base.lr,
                    hidden_dim=hidden_dim,
                )
            else:
                result = run_centralised_arm(
                    arm,
                    seed,
                    data,
                    cohort.feature_dim,
                    epochs=rounds * local_epochs,
                    batch=batch,
                    lr=base.lr,
                    hidden_dim=hidden_dim,
                )
            e = result.evaluation
            print(
                f"  {arm.label:<20} seed {seed}: slide AUC {e.slide.auc.value:.4f} "
                f"[{e.slide.auc.low:.3f}, {e.slide.auc.high:.3f}], patch AUC "
                f"{e.patch.auc:.4f}, {result.seconds:.0f} s",
                flush=True,
            )
            for line in privacy_lines(result):
                print(line, flush=True)
            results.append(result)
    summaries = summarise(results)
    print(
        f"\n### pooled test set: {len(data.test)} slides ({tumour} tumour); mean ± sd over "
        "seeds; CI: median of the per-seed bootstrap 95% CIs; ε reported: the largest any "
        "seed's run reported\n"
    )
    print(format_accuracy(summaries))
    print("\n### slide AUC lost to DP (non-private − private; issue 6 target: ≤ 0.05 at ε = 8)")
    for c in check_gaps(summaries):
        verdict = ("met" if c.met else "MISSED") if c.target else "(no target)"
        print(f"  {c.how} ε = {_eps(c.epsilon)}: {c.gap:+.4f} {verdict}")
    return summaries


def _epsilons(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"ε values must be > 0 (inf: no DP); got {text!r}")
    return values


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cohorts: a smoke run")
    parser.add_argument("--skip-timing", action="store_true", help="only accuracy vs ε")
    parser.add_argument("--skip-accuracy", action="store_true", help="only time per epoch")
    parser.add_argument(
        "--no-contrast-arm",
        action="store_true",
        help="skip the DP-SGD arm in the other precision (float32 where auto is bfloat16)",
    )
    parser.add_argument(
        "--timing-epochs", type=int, default=None, help="epochs per timing arm (default 2; quick 3)"
    )
    parser.add_argument(
        "--epsilons", type=_epsilons, default=[1.0, 4.0, 8.0, NON_PRIVATE], help="e.g. 1,4,8,inf"
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per ε (default 2; quick 1)")
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds (default 10)")
    parser.add_argument("--local-epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument(
        "--cohort",
        choices=sorted(COHORTS),
        default="privacy",
        help="accuracy vs ε on the DP-sized cohort (default: 200/200/100 training slides) or "
        "on bench.cohorts' FULL_COHORT (28/28/14)",
    )
    parser.add_argument(
        "--batch-slides",
        type=int,
        default=None,
        help="expected Poisson batch per site (default 16 on the privacy cohort, 8 on the "
        "accuracy cohort and with --quick)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=DP_LR,
        help=f"Adam learning rate of every arm (default {DP_LR:g}, 5x the trainer's 2e-4)",
    )
    parser.add_argument(
        "--hidden-dim",
        type=int,
        default=512,
        help="width of the model's per-patch embedding (run config model-hidden-dim)",
    )
    parser.add_argument(
        "--no-centralised", action="store_true", help="skip the pooled centralised arms"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for accuracy vs ε (default 1: bags of a few hundred patches only "
        "wait on each other over two threads; the timing part keeps torch's default)",
    )
    args = parser.parse_args(argv)
    # Opacus warns when the best of its RDP orders is the largest it tries (a large ε per step,
    # as on sites of 14-28 slides): ε is then still a valid upper bound, only one that larger
    # orders could tighten. Said once in the output instead of hundreds of times in the log.
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    print("# fedpath privacy benchmark" + (" (quick)" if args.quick else ""))
    print(f"machine: {machine()}")
    print(
        "ε: Opacus' RDP accountant over its default orders (an upper bound; where the best "
        "order is the largest one, larger orders could tighten it)"
    )
    if not args.skip_timing:
        main_timing(
            QUICK if args.quick else FULL,
            args.timing_epochs or (3 if args.quick else 2),
            args.no_contrast_arm,
        )
    if not args.skip_accuracy:
        torch.set_num_threads(args.threads)
        main_accuracy(
            QUICK_COHORT if args.quick else COHORTS[args.cohort],
            args.epsilons,
            args.seeds or (1 if args.quick else 2),
            args.rounds or (2 if args.quick else 10),
            args.local_epochs,
            args.batch_slides or DEFAULT_BATCH["quick" if args.quick else args.cohort],
            not args.no_centralised,
            args.hidden_dim,
            args.lr,
        )
    print(f"\nload average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
