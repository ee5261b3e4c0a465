"""The federated accuracy benchmark's parts: each hospital's own disk, real federated runs,
the table and issue 4's targets, on a tiny cohort with the ``tiny_cnn`` encoder."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import pytest

from bench.accuracy_federated import (
    FedArm,
    FedResult,
    FedSummary,
    check_targets,
    format_table,
    main,
    run_federated_arm,
    site_test_sets,
    summarise,
)
from bench.prepared_cohort import PreparedCohort, load_cohort
from bench.scoring import Evaluation
from bench.site_views import write_site_views
from fedpath.client.training.site_index import load_site_index


def _summary(
    how: str, mode: str, slide: float, patch_b: float, low_grade: float | None = None
) -> FedSummary:
    return FedSummary(
        FedArm(how, mode),
        1,
        (slide, 0.0),
        (0.9, 0.0),
        None if low_grade is None else (low_grade, 0.01),
        {"site_b": slide, "site_c": slide},
        {"site_b": patch_b, "site_c": patch_b},
        10,
        1,
    )


def test_targets_compare_federated_with_centralised_sites_and_weak() -> None:
    rows = [
        _summary("centralised", "weak", 0.97, 0.80),
        _summary("site:site_a", "weak", 0.95, 0.80),
        _summary("site:site_c", "weak", 0.80, 0.70),
        _summary("fedavg", "weak", 0.96, 0.80),
        _summary("fedavg", "mixed", 0.90, 0.85),
        _summary("centralised", "mixed", 0.97, 0.90),
        _summary("site:site_c", "mixed", 0.88, 0.75),
    ]
    checks = {c.name: c for c in check_targets(rows)}
    assert checks["fedavg weak: centralised − federated slide AUC"].met  # 0.01 ≤ 0.02
    assert not checks["fedavg mixed: centralised − federated slide AUC"].met  # 0.07
    assert checks["fedavg weak: slide AUC − worst single site"].value == pytest.approx(0.16)
    assert not checks["fedavg mixed: slide AUC − worst single site"].met  # 0.90 − 0.88
    assert checks["fedavg at site_b: patch AUC mixed − weak"].value == pytest.approx(0.05)
    assert "fedmix weak: centralised − federated slide AUC" not in checks  # no such arm
    assert len(format_table(rows).splitlines()) == 2 + len(rows)


def test_table_has_the_pooled_low_grade_patch_auc() -> None:
    table = format_table(
        [_summary("fedavg", "mixed", 0.9, 0.8, 0.75), _summary("x", "weak", 0.9, 0.8)]
    )
    head, rule, with_low, without = (line.split(" | ") for line in table.splitlines())
    assert head[5] == "low-grade patch AUC (pooled test)"
    assert with_low[5] == "0.7500 ± 0.0100" and without[5] == "n/a"
    assert len(rule[0].split("|")) - 2 == len(head)  # one rule cell per column


@pytest.mark.parametrize(
    "option", ["--low-grade-share", "--mimic-share", "--tumour-slide-mimic-share"]
)
def test_main_refuses_a_bad_share(capsys: pytest.CaptureFixture[str], option: str) -> None:
    """Every share option is the federated benchmark's too, validated before any work."""
    with pytest.raises(SystemExit) as exc:
        main(["--quick", option, "0.4,0.2"])
    assert exc.value.code == 2 and option in capsys.readouterr().err


@pytest.mark.slow
def test_site_views_hide_outlines_and_a_federated_run_scores(
    tmp_path: Path, flower_task, tiny_cohort: PreparedCohort
) -> None:
    cohort = tiny_cohort
    visible = frozenset(e.slide_id for e in cohort.hospitals[0].train if e.has_patch_labels)
    views = write_site_views(cohort, visible, tmp_path / "views")
    for hospital in cohort.hospitals:
        entries = load_site_index(views[hospital.name], ("normal", "tumour"))
        assert {e.split for e in entries} <= {"train", "val", "test"}
        assert len(entries) == len(hospital.train) + len(hospital.val) + len(hospital.test)
        for e in entries:
            with h5py.File(e.features, "r") as fh:
                has_labels = "patch_labels" in fh
            assert has_labels == (e.slide_id in visible), e.slide_id
            assert e.has_patch_labels == (e.slide_id in visible)
        with (views[hospital.name] / "prepared.csv").open() as fh:
            assert all(r["features"].startswith("features/") for r in csv.DictReader(fh))
    data = load_cohort(cohort, visible)
    by_site = site_test_sets(cohort, data)
    result = run_federated_arm(
        FedArm("fedavg", "mixed"),
        0,
        views,
        data,
        cohort,
        by_site,
        rounds=2,
        local_epochs=1,
        lr=1e-3,
    )
    assert isinstance(result, FedResult) and result.epochs == 2
    assert set(result.by_site) == {h.name for h in cohort.hospitals}
    assert isinstance(result.pooled, Evaluation)
    assert 0.0 <= result.pooled.slide.auc.value <= 1.0
    low = result.pooled.low_grade_patch  # TINY's tumour is heterogeneous
    assert low is not None and low.n_tumour > 0 and 0.0 <= low.auc <= 1.0
    (summary,) = summarise([result])
    assert summary.low_grade_patch_auc == (low.auc, 0.0)


def test_main_refuses_an_unknown_cohort(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--cohort", "easy"])
    assert exc.value.code == 2 and "--cohort" in capsys.readouterr().err
