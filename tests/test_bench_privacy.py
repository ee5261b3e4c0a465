"""The privacy benchmark's parts: the interleaved timing of both trainers and what it reports
(ratio from the two arms' own times, ε of the plan), the accuracy table and its gap checks,
and (slow) a real private federation on a tiny ``tiny_cnn`` cohort whose sites report the
ε the accountant gives for their plan."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import bench.privacy as privacy
import bench.privacy_timing as privacy_timing
from bench.cohorts import FULL_COHORT, PRIVACY_COHORT
from bench.interleave import contrast_precision
from bench.prepared_cohort import PreparedCohort, load_cohort, visible_annotations
from bench.scoring import Evaluation
from bench.site_views import write_site_dirs
from fedpath.client.embed.extract import cpu_supports_bf16
from fedpath.client.site_facts import read_site
from fedpath.client.training import trainer
from fedpath.client.training.bags import Bag
from fedpath.client.training.privacy_accountant import epsilon, sampling_plan
from fedpath.client.training.private_trainer import plan_private_training
from fedpath.client.training.site_index import BagEntry, load_site_index
from fedpath.client.training.trainer import resolve_precision
from fedpath.common.metrics import slide_metrics
from fedpath.common.patch_metrics import PatchMetrics


def _bags(n: int, dim: int, seed: int, split: str) -> list[Bag]:
    """Synthetic slides: tumour slides carry a shifted subset of patches; every other one has
    complete patch labels, so mixed supervision runs as shipped."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim).astype(np.float32)
    bags = []
    for i in range(n):
        label = i % 2
        size = int(rng.integers(20, 40))
        features = rng.standard_normal((size, dim)).astype(np.float32)
        positive = np.zeros(size, dtype=bool)
        if label:
            positive[: size // 4] = True
            features[positive] += direction
        labelled = i % 4 < 2
        entry = BagEntry(
            slide_id=f"{split}{i}",
            label=label,
            features=Path(f"/nonexistent/{split}{i}.h5"),
            split=split,
            patient_id=None,
            has_patch_labels=labelled,
            annotation_complete=True if labelled else None,
            num_patches=size,
        )
        labels = torch.from_numpy(positive.astype(np.int8)) if labelled else None
        bags.append(Bag(entry, torch.from_numpy(features), labels))
    return bags


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("bf16_fast", [True, False])
def test_timing_interleaves_the_trainers_and_reports_the_plan(
    monkeypatch: pytest.MonkeyPatch, bf16_fast: bool
) -> None:
    """The non-private and the DP-SGD arm both run what "auto" picks (bfloat16 on a fast-bf16
    CPU, else float32); the contrast DP-SGD arm runs the other precision."""
    monkeypatch.setattr(trainer, "fast_bf16_cpu", lambda: bf16_fast)
    shipped = "bfloat16" if bf16_fast else "float32"
    assert resolve_precision("auto", torch.device("cpu")) == shipped
    expected_contrast = "float32" if bf16_fast else ("bfloat16" if cpu_supports_bf16() else None)
    assert contrast_precision() == expected_contrast
    contrast = "float32" if bf16_fast else "bfloat16"  # emulated bfloat16 still runs
    train_bags, val_bags = _bags(20, 16, 0, "train"), _bags(6, 16, 1, "val")
    dp = privacy_timing.timing_dp(sigma=1.0).model_copy(update={"expected_batch_slides": 5})
    epochs = 2
    result = privacy_timing.time_epochs(train_bags, val_bags, epochs, dp, contrast=contrast)

    assert result.precision == shipped
    assert result.contrast is not None and result.contrast_precision == contrast
    assert len(result.non_private) == len(result.contrast) == len(result.private) == epochs
    assert all(r.seconds > 0 for r in result.non_private + result.contrast + result.private)
    # The ratios are the arms' own measured times, epoch pair by epoch pair.
    pairs = zip(result.non_private, result.private, strict=True)
    expected = [p.seconds / n.seconds for n, p in pairs]
    assert result.ratios == pytest.approx(expected)
    assert result.ratio == pytest.approx(float(np.median(expected)))
    pairs = zip(result.contrast, result.private, strict=True)
    assert result.contrast_ratios == pytest.approx([p.seconds / c.seconds for c, p in pairs])
    pairs = zip(result.non_private, result.contrast, strict=True)
    assert result.contrast_vs_non_private == pytest.approx(
        [c.seconds / n.seconds for n, c in pairs]
    )
    # Same secret seed: both private arms take the same Poisson steps; the loss differs only by
    # the forward's rounding.
    assert [r.steps for r in result.contrast] == [r.steps for r in result.private]
    for a, b in zip(result.private, result.contrast, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, abs=0.05)

    # What the private trainer ran is the plan for 20 slides: q = 5/20, 4 steps per epoch.
    plan = plan_private_training(dp, 20, epochs)
    assert result.mechanism == plan
    assert (result.mechanism.sample_rate, result.mechanism.steps) == (0.25, 8)
    assert [r.steps for r in result.private] == [4, 4]
    assert result.epsilon_spent() == pytest.approx(epsilon([plan], dp.delta))
    one_epoch = sampling_plan(20, 5)[1]
    assert one_epoch == 4
    assert 0 < result.epsilon_one_epoch() < result.epsilon_spent()

    table = privacy_timing.format_timing(result).splitlines()
    rows = [line for line in table if line.startswith("| ")]
    assert len(rows) == 4  # header + the three arms
    assert rows[1].startswith(f"| non-private (`train`, {shipped})")
    assert rows[2].startswith(f"| DP-SGD (`train_private`, {shipped}, σ = 1, C = 1)")
    assert rows[3].startswith(f"| DP-SGD (`train_private`, {contrast}, σ = 1, C = 1)")
    assert all("Poisson q = 0.250 (B = 5)" in row for row in rows[2:])
    ratio_line = next(line for line in table if line.startswith("DP-SGD / non-private:"))
    assert f"median per-epoch ratio {result.ratio:.2f}×" in ratio_line
    contrast_line = next(line for line in table if line.startswith(f"DP-SGD {shipped} / DP-SGD"))
    assert f"{float(np.median(result.contrast_ratios)):.2f}×" in contrast_line
    before_line = next(line for line in table if line.startswith(f"DP-SGD {contrast} / non-"))
    assert f"{float(np.median(result.contrast_vs_non_private)):.2f}×" in before_line
    eps_line = next(line for line in table if line.startswith("ε per epoch"))
    assert f"{result.epsilon_one_epoch():.3f}" in eps_line
    assert f"({plan.steps} noisy steps): {result.epsilon_spent():.3f}" in eps_line


def _evaluation(slide_prob: float, patch_auc: float) -> Evaluation:
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, slide_prob, 0.6, 0.9])
    slide = slide_metrics(y, np.stack([1 - p1, p1], axis=1), bootstrap=20, seed=0)
    return Evaluation(slide, PatchMetrics(patch_auc, patch_auc, 0.5, 100, 10, 4, 0.5))


def _result(how: str, eps: float, seed: int, slide_prob: float) -> privacy.PrivacyResult:
    spent = {}
    if math.isfinite(eps):
        spent = {"site_a": privacy.SitePrivacy(28, 1.5 + seed, eps - 0.01 * seed, eps)}
    arm = privacy.PrivacyArm(how, eps)
    return privacy.PrivacyResult(arm, seed, _evaluation(slide_prob, 0.8), spent, 10.0)


def test_accuracy_table_and_gap_to_non_private() -> None:
    results = [
        # slide prob 0.2 on a normal slide: AUC 1.0; 0.7: one pair swapped, AUC 0.75
        _result("fedavg", 8.0, 0, 0.7),
        _result("fedavg", 8.0, 1, 0.2),
        _result("fedavg", 1.0, 0, 0.7),
        _result("fedavg", math.inf, 0, 0.2),
        _result("centralised", 8.0, 0, 0.2),
    ]
    summaries = privacy.summarise(results)
    assert [(s.arm.how, s.arm.epsilon, s.n_seeds) for s in summaries] == [
        ("fedavg", 8.0, 2),
        ("fedavg", 1.0, 1),
        ("fedavg", math.inf, 1),
        ("centralised", 8.0, 1),
    ]
    assert summaries[0].slide_auc[0] == pytest.approx(0.875)
    assert summaries[0].reported == {"site_a": pytest.approx(8.0)}  # the larger of the seeds
    table = privacy.format_accuracy(summaries).splitlines()
    assert len(table) == 6
    assert table[2].startswith("| fedavg | 8 | 2 | 0.8750 ± ")
    assert "site_a 1.50" in table[2] and "site_a 8.00" in table[2]
    assert table[4].startswith("| fedavg | ∞ | 1 | 1.0000 ± 0.0000") and "| — | — |" in table[4]

    checks = privacy.check_gaps(summaries)
    # centralised has no non-private row here: nothing to compare with
    assert [(c.how, c.epsilon) for c in checks] == [("fedavg", 1.0), ("fedavg", 8.0)]
    low, target = checks
    assert low.gap == pytest.approx(0.25) and not low.target
    assert target.gap == pytest.approx(0.125) and target.target and not target.met


def test_the_privacy_cohort_is_sized_for_dp_sgd() -> None:
    """DESIGN §4.5: hundreds of slides per site and Poisson batches of 16-32; a batch that is
    a large share of a site buys no amplification by sampling."""
    spec = PRIVACY_COHORT
    batch = privacy.DEFAULT_BATCH["privacy"]
    assert 16 <= batch <= 32
    for hospital in spec.hospitals:
        n_train = round(hospital.n_pool * (1 - spec.val_share))
        assert n_train >= 100
        assert batch / n_train <= 0.16
    # The accuracy cohort's smallest site (14 training slides) keeps its smaller batch.
    smallest = min(h.n_pool for h in FULL_COHORT.hospitals)
    assert privacy.DEFAULT_BATCH["accuracy"] < round(smallest * (1 - spec.val_share))


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_private_federation_on_a_tiny_cohort_reports_the_planned_epsilon(
    tmp_path: Path, tiny_cohort: PreparedCohort
) -> None:
    cohort = tiny_cohort
    visible = visible_annotations(cohort, {"site_a": 1.0}, seed=0)
    data = load_cohort(cohort, visible)

    # The site directories a run gets: relative feature paths (symlinks) that the site index
    # accepts, and patch labels only where the hospital may use them.
    sites = write_site_dirs(cohort, visible, tmp_path / "sites")
    for hospital in cohort.hospitals:
        entries = load_site_index(sites[hospital.name], ("normal", "tumour"))
        expected = {e.slide_id for e in hospital.train + hospital.val + hospital.test}
        assert {e.slide_id for e in entries} == expected
        assert read_site(sites[hospital.name])["encoder"] == "tiny_cnn"
        for e in entries:
            with h5py.File(e.features, "r") as fh:
                has_labels = "patch_labels" in fh
            assert has_labels == (e.split == "train" and e.slide_id in visible)

    arm = privacy.PrivacyArm("fedavg", 4.0)
    result = privacy.run_federated_arm(
        arm, 0, cohort, visible, data, rounds=2, local_epochs=1, batch=8, lr=2e-4, hidden_dim=32
    )
    assert set(result.spent) == {"site_a", "site_b"}
    dp = privacy.private_dp(4.0, 8, rounds=2)
    for hospital in cohort.hospitals:
        spent = result.spent[hospital.name]
        plan = plan_private_training(dp, len(hospital.train), 1)
        assert spent.n_train == len(hospital.train)
        assert spent.sigma == pytest.approx(plan.noise_multiplier)
        assert spent.planned == pytest.approx(epsilon([plan, plan], dp.delta))
        # What the run reported (final.json) is the accountant's ε for the plan, at the target.
        assert spent.reported == pytest.approx(spent.planned, rel=1e-6)
        assert 3.9 <= spent.reported <= 4.0
    assert 0.0 <= result.evaluation.slide.auc.value <= 1.0

    plain = privacy.run_federated_arm(
        privacy.PrivacyArm("fedavg", math.inf),
        0,
        cohort,
        visible,
        data,
        rounds=1,
        local_epochs=1,
        batch=8,
        lr=2e-4,
    )
    assert plain.spent == {}

    central = privacy.run_centralised_arm(
        privacy.PrivacyArm("centralised", 4.0),
        0,
        data,
        cohort.feature_dim,
        epochs=2,
        batch=8,
        lr=2e-4,
    )
    pooled = central.spent["pooled"]
    assert pooled.n_train == len(data.train)
    assert pooled.reported == pytest.approx(pooled.planned, rel=1e-6)
    assert 3.9 <= pooled.reported <= 4.0
