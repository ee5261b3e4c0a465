"""Training benchmark: the site-local trainer vs a CLAM-style one-slide-per-step loop.

Usage (from the repository root)::

    .venv/bin/python -m bench.training             # 200 slides x 5,000 patches, ~15-30 min
    .venv/bin/python -m bench.training --quick     # a smoke run of a minute or two
    .venv/bin/python -m bench.training --epochs 6  # more epochs for the loss comparison

(a) GB/s loading a synthetic feature-bag cohort (``bench.feature_cohort``) as ``fedpath local
train`` does; (b) s/epoch and seconds to equal validation loss of the site-local trainer as
shipped, on every patch and in the other precision, vs CLAM's one-slide-per-step loop, epochs
interleaved from the same weights (``bench.interleave``); (c) peak RSS training one
100,000-patch bag in a child process. How and why: ``bench/README.md``.

Targets (issue 3): ours >= 3x faster than the baseline at equal or better validation loss;
peak RSS < 2 GB for the 100,000-patch bag.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from bench.feature_cohort import DIM, FULL, QUICK, ROOT, Scale, ensure_big_bag, ensure_cohort
from bench.interleave import ArmEpoch, contrast_precision, run_arms
from bench.machine import load_average, machine
from bench.memory import mib, peak_rss
from fedpath.client.training.bags import Bag, collate, load_bag
from fedpath.client.training.site_index import BagEntry
from fedpath.client.training.trainer import (
    EpochMetrics,
    epoch_seeds,
    evaluate,
    resolve_precision,
    step_lr,
    train,
)
from fedpath.common.mil.config import ModelConfig
from fedpath.common.mil.losses import mixed_supervision_loss
from fedpath.common.mil.models import MILModel, build_model
from fedpath.common.mil.sampling import epoch_schedule
from fedpath.common.train_config import TrainConfig

# ------------------------------------------------------------------------------ the arms


def clam_epoch(
    model: MILModel,
    optimiser: torch.optim.Optimizer,
    bags: Sequence[Bag],
    epoch: int,
    cfg: TrainConfig,
) -> tuple[float, int]:
    """CLAM's loop: one slide per forward, backward and Adam step; float32; same slides.

    The schedule is the trainer's own for this epoch (same seeds), its pairs flattened, so
    both arms see the same slides in the same order; dropout and instance sampling are seeded
    per epoch as the trainer does. Returns the mean total loss and the number of steps.
    """
    np_seed, torch_seed, gen_seed = epoch_seeds(cfg.seed, epoch)
    labels = np.asarray([b.entry.label for b in bags], dtype=np.int64)
    annotated = np.asarray([b.patch_labels is not None for b in bags], dtype=bool)
    rng = np.random.default_rng(np_seed)
    torch.manual_seed(torch_seed)
    generator = torch.Generator().manual_seed(gen_seed)
    schedule = epoch_schedule(labels, annotated, epoch, cfg.supervision, rng, cfg.steps_per_epoch)
    model.train()
    total, steps = 0.0, 0
    for i in (i for group in schedule for i in group):
        batch = collate([bags[i]])  # a view: batch of one, no padding, no mask needed
        out = model(batch.features, batch.mask)
        parts = mixed_supervision_loss(
            out.logits,
            out.attention,
            out.instance_logits,
            batch.labels,
            batch.patch_labels,
            batch.annotation_complete,
            batch.mask,
            cfg.supervision,
            generator,
        )
        optimiser.zero_grad(set_to_none=True)
        parts.total.backward()
        optimiser.step()
        total += float(parts.total.detach())
        steps += 1
    return total / max(steps, 1), steps


def seconds_to_loss(epochs: Sequence[ArmEpoch], initial_loss: float, target: float) -> float | None:
    """Training seconds an arm took to bring its validation loss down to ``target``: the whole
    epochs before the one that crosses it, plus the share of that epoch found by interpolating
    the loss linearly across it (from the loss before it). None: never reached.

    Validation only runs between epochs, so without the interpolation an arm that crosses the
    target early in an epoch would be charged for all of it.
    """
    if initial_loss <= target:
        return 0.0
    elapsed, before = 0.0, initial_loss  # before > target on every pass of the loop
    for record in epochs:
        if record.val.loss <= target:
            share = (before - target) / (before - record.val.loss)  # in (0, 1]
            return elapsed + share * record.seconds
        elapsed += record.seconds
        before = record.val.loss
    return None


@dataclass(frozen=True)
class EqualLossSpeedup:
    """How much sooner ours reaches its own best validation loss than the baseline does."""

    target_loss: float
    ours_seconds: float
    baseline_seconds: float
    reached: bool
    """False: the baseline never got there, and ``ratio`` is a lower bound."""

    @property
    def ratio(self) -> float:
        return self.baseline_seconds / self.ours_seconds


def equal_loss_speedup(
    ours: Sequence[ArmEpoch], baseline: Sequence[ArmEpoch], initial_loss: float
) -> EqualLossSpeedup | None:
    """The issue's "faster at equal validation loss", measured: the target is the best
    validation loss ours reached (the epoch the trainer's early stopping would keep), and each
    arm is charged the training seconds it needed to reach it. None when ours never went below
    the loss of the initial weights: there is no level to compare at."""
    target = min(r.val.loss for r in ours)
    mine = seconds_to_loss(ours, initial_loss, target)
    if mine is None or mine <= 0:
        return None
    theirs = seconds_to_loss(baseline, initial_loss, target)
    if theirs is None:
        return EqualLossSpeedup(target, mine, sum(r.seconds for r in baseline), reached=False)
    return EqualLossSpeedup(target, mine, theirs, reached=True)


ALL_PATCHES = "ours all-patch"
"""The arm that trains on every patch of every slide (``max_train_patches=None``): what the
shipped patch sampling buys, in the shipped precision."""


def train_arms(
    scale: Scale, epochs: int, train_bags: list[Bag], val_bags: list[Bag], with_fp32: bool
) -> tuple[float, dict[str, list[ArmEpoch]]]:
    """Ours (shipped), ours in the other precision and CLAM's loop, from the same weights;
    returns the validation loss of those weights and every arm's epochs.

    The other precision is float32 where the shipped "auto" picks bfloat16 (AMX), and
    bfloat16 where the CPU has native bfloat16 but "auto" keeps float32 (it is slower there on
    some CPUs, faster on others: this arm measures which one this machine is).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        initial = build_model(ModelConfig(feature_dim=DIM))
    base = TrainConfig(epochs=epochs, min_epochs=0, patience=epochs + 1)

    def ours(cfg: TrainConfig) -> Callable[[Callable[[ArmEpoch], None]], None]:
        def run(after_epoch: Callable[[ArmEpoch], None]) -> None:
            model = copy.deepcopy(initial)

            def on_epoch(m: EpochMetrics) -> None:
                val = evaluate(model, val_bags)  # float32, untimed, same for every arm
                after_epoch(ArmEpoch(m.seconds, m.n_steps, m.train_loss, val))

            train(model, train_bags, [], cfg, on_epoch=on_epoch)

        return run

    def clam(after_epoch: Callable[[ArmEpoch], None]) -> None:
        model = copy.deepcopy(initial)
        optimiser = torch.optim.Adam(model.parameters(), lr=base.lr, weight_decay=base.weight_decay)
        for epoch in range(epochs):
            began = time.perf_counter()
            loss, steps = clam_epoch(model, optimiser, train_bags, epoch, base)
            seconds = time.perf_counter() - began
            after_epoch(ArmEpoch(seconds, steps, loss, evaluate(model, val_bags)))

    arms: dict[str, Callable[[Callable[[ArmEpoch], None]], None]] = {"ours": ours(base)}
    if base.max_train_patches is not None:
        arms[ALL_PATCHES] = ours(base.model_copy(update={"max_train_patches": None}))
    other = contrast_precision()
    if with_fp32 and other is not None:
        arms[f"ours {other}"] = ours(base.model_copy(update={"precision": other}))
    arms["CLAM loop"] = clam

    def report(name: str, epoch: int, r: ArmEpoch) -> None:
        print(
            f"  epoch {epoch}  {name:<13} {r.seconds:8.1f} s  {r.steps:4d} steps  "
            f"train {r.train_loss:+.4f}  val loss {r.val.loss:.4f}  AUC {r.val.auc:.3f}  "
            f"patch AUC {r.val.patch_auc:.3f}  (load {load_average()})",
            flush=True,
        )

    initial_loss = evaluate(initial, val_bags).loss
    return initial_loss, run_arms(arms, epochs, report)


# ------------------------------------------------------------------------ memory child


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one big bag and train two steps on it; report memory and timings."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_dim=DIM))
    before = psutil.Process().memory_info().rss
    entry = BagEntry(**{**spec["entry"], "features": Path(spec["entry"]["features"])})
    began = time.perf_counter()
    bag = load_bag(entry, DIM)
    load_seconds = time.perf_counter() - began
    after_load = psutil.Process().memory_info().rss
    cfg = TrainConfig(
        epochs=1,
        steps_per_epoch=2,
        min_epochs=0,
        precision=spec["precision"],
        max_train_patches=spec["max_train_patches"],
    )
    result = train(model, [bag], [], cfg)
    return {
        "patches": bag.num_patches,
        "rss_before": before,
        "rss_after_load": after_load,
        "peak": peak_rss(),
        "load_seconds": load_seconds,
        "step_seconds": result.history[0].seconds / result.history[0].n_steps,
        "precision": result.precision,
    }


def run_child(entry: BagEntry, precision: str, max_train_patches: int | None) -> dict[str, Any]:
    spec = {
        "precision": precision,
        "max_train_patches": max_train_patches,
        "entry": {**entry.__dict__, "features": str(entry.features)},
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bench.training", "--child", json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- main


def _equal_loss_line(name: str, equal: EqualLossSpeedup | None) -> str:
    """One arm's speed-up over the CLAM loop at that arm's best validation loss."""
    head = f"speed-up at equal validation loss, {name} vs CLAM loop:"
    if equal is None:
        return f"{head} not measurable (it never went below the initial loss)"
    theirs = (
        f"CLAM loop {equal.baseline_seconds:.0f} s"
        if equal.reached
        else f"CLAM loop not within its {equal.baseline_seconds:.0f} s"
    )
    bound = "" if equal.reached else ">"
    return (
        f"{head} {equal.target_loss:.4f} in {equal.ours_seconds:.0f} s, {theirs} -> "
        f"{bound}{equal.ratio:.2f}x (target >= 3x)"
    )


def main(scale: Scale, epochs: int, with_fp32: bool) -> None:
    print("# fedpath training benchmark" + (" (quick)" if scale is QUICK else ""))
    print(f"machine: {machine()}")
    cfg = TrainConfig()
    shipped = resolve_precision(cfg.precision, torch.device("cpu"))
    print(
        f"shipped TrainConfig: precision {cfg.precision} -> {shipped}; lr {cfg.lr} per slide, "
        f"lr_scaling {cfg.lr_scaling} -> {step_lr(cfg, 2):.3g} per normal+tumour pair step; "
        f"max_batch_patches {cfg.max_batch_patches}"
    )

    train_entries, val_entries = ensure_cohort(scale)
    began = time.perf_counter()
    train_bags = [load_bag(e, DIM) for e in train_entries]
    val_bags = [load_bag(e, DIM) for e in val_entries]
    seconds = time.perf_counter() - began
    nbytes = sum(b.features.numel() * 4 for b in train_bags + val_bags)
    patches = [b.num_patches for b in train_bags]
    print(
        f"\n## (a) cohort: {len(train_bags)} train slides ({sum(patches):,} patches, "
        f"{min(patches):,}-{max(patches):,} per slide, "
        f"{sum(b.entry.label for b in train_bags)} tumour, "
        f"{sum(b.patch_labels is not None for b in train_bags)} with patch labels), "
        f"{len(val_bags)} val slides"
    )
    print(
        f"load_bag: {nbytes / 2**30:.2f} GiB in {seconds:.1f} s = "
        f"{nbytes / 2**30 / seconds:.2f} GiB/s (page cache warm after the first run)"
    )

    print(
        f"\n## (b) {epochs} epochs per arm, interleaved epoch by epoch "
        "(val: float32 evaluate after each epoch, not timed)"
    )
    initial_loss, results = train_arms(scale, epochs, train_bags, val_bags, with_fp32)
    ours, clam = results["ours"], results["CLAM loop"]
    ratios = [c.seconds / o.seconds for o, c in zip(ours, clam, strict=True)]
    print(
        f"\n{'arm':<14} {'median s/epoch':>14} {'steps':>6} {'val loss':>9} {'val AUC':>8} "
        f"{'patch AUC':>9}   (val after epoch {epochs - 1})"
    )
    for name, records in results.items():
        last = records[-1]
        print(
            f"{name:<14} {statistics.median(r.seconds for r in records):>14.1f} "
            f"{last.steps:>6} {last.val.loss:>9.4f} {last.val.auc:>8.3f} "
            f"{last.val.patch_auc:>9.3f}"
        )
    print(
        f"speed-up ours vs CLAM loop: median per-epoch ratio {statistics.median(ratios):.2f}x "
        f"(epochs: {', '.join(f'{r:.2f}' for r in ratios)}; target >= 3x)"
    )
    other = contrast_precision()
    if other is not None and f"ours {other}" in results:
        alt = results[f"ours {other}"]
        vs_clam = [c.seconds / a.seconds for a, c in zip(alt, clam, strict=True)]
        vs_ours = [o.seconds / a.seconds for o, a in zip(ours, alt, strict=True)]
        print(
            f"  ours in {other} vs CLAM loop {statistics.median(vs_clam):.2f}x; "
            f"ours in {other} vs shipped precision {statistics.median(vs_ours):.2f}x; "
            f"val loss after the last epoch {alt[-1].val.loss:.4f}"
        )
    per_epoch = ", ".join(
        f"{o.val.loss:.4f}/{c.val.loss:.4f}" for o, c in zip(ours, clam, strict=True)
    )
    verdict = "equal or better" if ours[-1].val.loss <= clam[-1].val.loss else "WORSE"
    print(f"val loss ours/CLAM per epoch: {per_epoch} -> ours {verdict} after {epochs} epochs")
    best_ours, best_clam = min(r.val.loss for r in ours), min(r.val.loss for r in clam)
    print(f"best val loss over the epochs: ours {best_ours:.4f}, CLAM loop {best_clam:.4f}")
    for name, records in results.items():
        if name != "CLAM loop":
            print(_equal_loss_line(name, equal_loss_speedup(records, clam, initial_loss)))
    print(
        f"  (the loss each arm's best epoch reached, {initial_loss:.4f} before training; "
        "training seconds to reach it, interpolated within the crossing epoch)"
    )

    print(
        f"\n## (c) peak RSS training on one {scale.big_bag:,}-patch bag "
        f"({scale.big_bag * DIM * 4 / 2**20:,.0f} MiB of features), child process"
    )
    big = ensure_big_bag(scale.big_bag)
    print(
        f"{'precision, patches':<30} {'RSS before':>11} {'after load':>11} {'peak':>10} "
        f"{'load s':>7} {'s/step':>7}"
    )
    shipped = TrainConfig().max_train_patches
    runs = [("auto", shipped), ("auto", None), ("float32", None)]
    for precision, cap in runs if shipped is not None else runs[1:]:
        r = run_child(big, precision, cap)
        label = f"{precision}->{r['precision']}" if precision == "auto" else precision
        label += f", {cap} patches" if cap is not None else ", all patches"
        print(
            f"{label:<30} {mib(r['rss_before']):>11} {mib(r['rss_after_load']):>11} "
            f"{mib(r['peak']):>10} {r['load_seconds']:>7.2f} {r['step_seconds']:>7.2f}"
        )
    print(f"target: peak < 2 GB (1,907 MiB); load average at the end {load_average()}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small cohort, a smoke run")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per arm")
    parser.add_argument(
        "--no-fp32-arm",
        action="store_true",
        help="skip the arm in the other precision (faster)",
    )
    args = parser.parse_args()
    chosen = QUICK if args.quick else FULL
    main(chosen, args.epochs or chosen.epochs, not args.no_fp32_arm)
