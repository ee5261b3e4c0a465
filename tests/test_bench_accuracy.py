"""The accuracy benchmark's reusable parts: ground truth and grades from masks, splits, label
visibility, the low-grade metrics, the low-grade and mimic share options, and the whole
cohort → train → table path on a tiny heterogeneous-tumour cohort (with benign mimics in its
normal tissue) and the ``tiny_cnn`` encoder."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

import bench.accuracy as accuracy_module
from bench.accuracy import (
    ARMS,
    Arm,
    RunResult,
    check_targets,
    format_table,
    main,
    run_arm,
    summarise,
)
from bench.cohorts import (
    COHORTS,
    FULL_COHORT,
    LOW_GRADE_COHORT,
    LOW_GRADE_SHARE,
    MIMIC_SHARE,
    QUICK_COHORT,
    SUBTLE_COHORT,
    TUMOUR,
    TUMOUR_SLIDE_MIMIC_SHARE,
    CohortSpec,
    HospitalSpec,
    add_cohort_option,
    add_share_options,
    apply_share_options,
    share_range,
    synth_config,
)
from bench.prepared_cohort import (
    HIGH_GRADE,
    LOW_GRADE,
    NORMAL_GRADE,
    Hospital,
    PreparedCohort,
    annotated_share,
    build_cohort,
    describe,
    ground_truth,
    load_cohort,
    mask_patch_fraction,
    validation_split,
    visible_annotations,
)
from bench.scoring import Evaluation, evaluate_bags, feature_ceiling, low_grade_patch_metrics
from fedpath.client.training.bags import Bag
from fedpath.client.training.evaluate import predict_bag
from fedpath.client.training.site_index import BagEntry
from fedpath.common.metrics import slide_metrics
from fedpath.common.mil.config import ModelConfig
from fedpath.common.mil.models import build_model
from fedpath.common.patch_metrics import PatchMetrics
from fedpath.common.train_config import TrainConfig
from tests.bench_fixtures import TINY


def _entry(slide_id: str, label: int, complete: bool | None = None) -> BagEntry:
    return BagEntry(
        slide_id=slide_id,
        label=label,
        features=Path(f"/nonexistent/{slide_id}.h5"),
        split=None,
        patient_id=None,
        has_patch_labels=complete is not None,
        annotation_complete=complete,
        num_patches=10,
    )


def test_mask_patch_fraction_is_exact_for_unaligned_patches() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) < 0.3
    ds, size = 4, 16
    coords = np.array([[0, 0], [3, 5], [17, 22], [150, 120], [190, 150]])
    # Brute force: upsample the mask to level 0 and average each footprint; beyond the mask
    # (the last patch overhangs it) counts as no tumour.
    level0 = np.pad(np.kron(mask, np.ones((ds, ds), dtype=bool)), ((0, size), (0, size)))
    expected = [level0[y : y + size, x : x + size].mean() for x, y in coords]
    got = mask_patch_fraction(mask, ds, coords, size)
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_validation_split_is_stratified_and_seeded() -> None:
    entries = [_entry(f"s{i}", i % 2) for i in range(20)]
    train, val = validation_split(entries, 0.2, seed=3)
    assert sorted(e.label for e in val) == [0, 0, 1, 1]
    assert {e.slide_id for e in train} | {e.slide_id for e in val} == {e.slide_id for e in entries}
    assert not {e.slide_id for e in train} & {e.slide_id for e in val}
    again = validation_split(entries, 0.2, seed=3)[1]
    assert [e.slide_id for e in again] == [e.slide_id for e in val]
    # One slide of a label stays in training; two or more give validation at least one.
    tiny = [_entry("n0", 0), _entry("t0", 1), _entry("t1", 1)]
    assert [e.label for e in validation_split(tiny, 0.2, seed=0)[1]] == [1]


def _write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), mask.astype(np.uint8) * 255)


def test_ground_truth_grades_patches_from_the_masks(tmp_path: Path) -> None:
    # Seven 16-px patches in a row over a mask at 4 level-0 px per mask px: 4×4 mask px each.
    ds, size, n = 4, 16, 7
    tumour = np.zeros((4, 4 * n), dtype=bool)
    low = np.zeros_like(tumour)
    tumour[:, 4:24] = True  # patches 1-5 all tumour
    tumour[:, 24] = True  # patch 6: a quarter tumour, ambiguous
    low[:, 4:8] = True  # patch 1: all low-grade
    low[:, 12:14] = True  # patch 3: half low-grade, half high-grade
    low[0, 16] = True  # patch 4: 1/16 low-grade, still high-grade
    low[:, 20:24] = True  # patch 5: 15/16 low-grade
    low[3, 23] = False
    site = tmp_path / "site"
    _write_mask(site / "masks" / "graded_tumour.png", tumour)
    _write_mask(site / "masks" / "graded_low_grade.png", low)
    _write_mask(site / "masks" / "uniform_tumour.png", tumour)  # no low-grade file
    rows = [f"{sid},masks/{sid}_tumour.png,{ds},0.5" for sid in ("graded", "uniform")]
    header = "slide_id,tumour_mask,mask_downsample,tumour_fraction"
    (site / "ground_truth.csv").write_text("\n".join([header, *rows]) + "\n")
    entries = []
    for sid in ("graded", "uniform"):
        features = tmp_path / f"{sid}.h5"
        with h5py.File(features, "w") as fh:
            fh["coords"] = np.array([[size * i, 0] for i in range(n)])
            fh.attrs["patch_size_level0"] = size
        entries.append(replace(_entry(sid, TUMOUR), features=features, num_patches=n))

    truth = ground_truth(site, entries)
    graded, uniform = truth["graded"], truth["uniform"]
    np.testing.assert_array_equal(graded.labels, [0, 1, 1, 1, 1, 1, -1])
    n_, hi, lo = NORMAL_GRADE, HIGH_GRADE, LOW_GRADE
    np.testing.assert_array_equal(graded.grade, [n_, lo, hi, -1, hi, lo, -1])
    assert graded.grade.dtype == np.int8 and graded.tumour_fraction == 0.5
    # Without a low-grade mask every tumour patch is high-grade: no 2s.
    np.testing.assert_array_equal(uniform.labels, graded.labels)
    np.testing.assert_array_equal(uniform.grade, [n_, hi, hi, hi, hi, hi, -1])


def _cohort(
    train: list[BagEntry], name: str = "site_a", val: list[BagEntry] | None = None
) -> PreparedCohort:
    spec = CohortSpec(hospitals=(HospitalSpec(name=name, n_pool=len(train), n_test=2),))
    hospital = Hospital(name, tuple(train), tuple(val or ()), ())
    return PreparedCohort(spec, Path("/nonexistent"), (hospital,), {}, {}, {}, 64)


def test_visible_annotations_share_and_partial_half() -> None:
    train = [_entry(f"c{i}", TUMOUR, True) for i in range(6)]
    train += [_entry(f"p{i}", TUMOUR, False) for i in range(4)]
    train += [_entry(f"n{i}", 0) for i in range(10)]
    cohort = _cohort(train)
    visible = visible_annotations(cohort, {"site_a": 0.4}, seed=1)
    assert len(visible) == 4
    assert sum(v.startswith("p") for v in visible) == 2
    assert annotated_share(cohort, visible) == (4, 2, 10)
    assert visible_annotations(cohort, {}, seed=1) == frozenset()
    assert visible_annotations(cohort, {"site_a": 0.4}, seed=1) == visible


def test_validation_outlines_are_drawn_apart_from_the_training_ones() -> None:
    """With "val" among the splits the same share of validation tumour slides shows its
    outlines, and the training slides chosen are those chosen without it."""
    train = [_entry(f"c{i}", TUMOUR, True) for i in range(6)]
    train += [_entry(f"n{i}", 0) for i in range(6)]
    val = [_entry(f"vc{i}", TUMOUR, True) for i in range(5)]
    val += [_entry(f"vp{i}", TUMOUR, False) for i in range(5)] + [_entry("vn", 0)]
    cohort = _cohort(train, val=val)
    only_train = visible_annotations(cohort, {"site_a": 0.5}, seed=3)
    both = visible_annotations(cohort, {"site_a": 0.5}, seed=3, splits=("train", "val"))
    assert only_train < both
    shown_val = both - only_train
    assert len(shown_val) == 5 and all(v.startswith("v") for v in shown_val)
    assert annotated_share(cohort, both, "val") == (5, 2, 10)
    assert annotated_share(cohort, both) == annotated_share(cohort, only_train) == (3, 0, 6)


def test_low_grade_patch_metrics_compare_low_grade_with_normal_only() -> None:
    rng = np.random.default_rng(4)
    grades = [rng.integers(-1, 3, size=n).astype(np.int8) for n in (30, 1, 45)]
    probs = [rng.random(g.size) for g in grades]
    got = low_grade_patch_metrics(zip(grades, probs, strict=True))
    assert got is not None
    g, p = np.concatenate(grades), np.concatenate(probs)
    keep = (g == LOW_GRADE) | (g == NORMAL_GRADE)  # high-grade and −1 patches are left out
    y = (g[keep] == LOW_GRADE).astype(int)
    assert got.auc == pytest.approx(roc_auc_score(y, p[keep]))
    assert got.average_precision == pytest.approx(average_precision_score(y, p[keep]))
    assert (got.n_labelled, got.n_tumour, got.n_slides) == (keep.sum(), y.sum(), 3)
    # No low-grade patch anywhere: nothing to score (a uniform-tumour cohort).
    no_low = [np.where(x == LOW_GRADE, HIGH_GRADE, x).astype(np.int8) for x in grades]
    assert low_grade_patch_metrics(zip(no_low, probs, strict=True)) is None


def test_evaluate_bags_scores_low_grade_only_when_given_grades() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="abmil", feature_dim=8))
    rng = np.random.default_rng(1)
    bags, grade = [], {}
    for i, label in enumerate((0, 1, 1)):
        g = rng.integers(0, 3, size=20).astype(np.int8) if label else np.zeros(12, np.int8)
        truth = torch.from_numpy((g > 0).astype(np.int8))
        entry = replace(_entry(f"s{i}", label), num_patches=g.size)
        bags.append(Bag(entry, torch.randn(g.size, 8), truth))
        grade[entry.slide_id] = g
    plain = evaluate_bags(model, bags, bootstrap=10)  # bench.privacy's call
    assert plain.low_grade_patch is None
    graded = evaluate_bags(model, bags, bootstrap=10, grade=grade)
    assert graded.patch == plain.patch
    model.eval()
    with torch.no_grad():
        probs = [predict_bag(model, b).patch_tumour_prob for b in bags]
    g, p = np.concatenate(list(grade.values())), np.concatenate(probs)
    keep = g != HIGH_GRADE
    assert graded.low_grade_patch is not None
    assert graded.low_grade_patch.auc == pytest.approx(roc_auc_score(g[keep] == 2, p[keep]))


def test_share_range_parses_lo_hi_or_one_share() -> None:
    assert share_range("0.4,0.8") == (0.4, 0.8)
    assert share_range(" 0.3 , 0.6") == (0.3, 0.6)
    assert share_range("0") == share_range("0,0") == (0.0, 0.0)
    assert share_range("0.5") == (0.5, 0.5)
    for bad in ("", "low", "0.4,", "0.1,0.2,0.3", "nan", "0,inf"):
        with pytest.raises(argparse.ArgumentTypeError, match="LO,HI"):
            share_range(bad)


def test_low_grade_share_option() -> None:
    parser = argparse.ArgumentParser()
    add_share_options(parser)
    assert parser.parse_args([]).low_grade_share is None
    assert parser.parse_args(["--low-grade-share", "0.2,0.6"]).low_grade_share == (0.2, 0.6)
    with pytest.raises(SystemExit):
        parser.parse_args(["--low-grade-share", "a,b"])

    assert FULL_COHORT.low_grade_share_range == QUICK_COHORT.low_grade_share_range
    assert QUICK_COHORT.low_grade_share_range == LOW_GRADE_SHARE == (0.4, 0.8)
    assert apply_share_options(parser, QUICK_COHORT) is QUICK_COHORT
    off = apply_share_options(parser, QUICK_COHORT, low_grade=(0.0, 0.0))
    assert off.low_grade_share_range == (0.0, 0.0)
    assert off.mimic_share_range == QUICK_COHORT.mimic_share_range  # the other option: as was
    assert off.hospitals == QUICK_COHORT.hospitals
    assert off.synth_key() != QUICK_COHORT.synth_key()  # another cohort, another cache
    # The generator's bounds: at most 0.9 low-grade, and an ordered range.
    for share in ((0.5, 0.95), (0.8, 0.4), (-0.1, 0.5)):
        with pytest.raises(SystemExit):
            apply_share_options(parser, QUICK_COHORT, low_grade=share)


def test_mimic_share_option_reaches_every_generated_site() -> None:
    parser = argparse.ArgumentParser()
    add_share_options(parser)
    assert parser.parse_args([]).mimic_share is None
    assert parser.parse_args(["--mimic-share", "0.05,0.3"]).mimic_share == (0.05, 0.3)
    assert parser.parse_args(["--mimic-share", "0"]).mimic_share == (0.0, 0.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--mimic-share", "some"])

    # The benchmark cohorts have the mimic on tumour slides only; a spec that does not ask
    # for it has none.
    assert FULL_COHORT.mimic_share_range == QUICK_COHORT.mimic_share_range == MIMIC_SHARE
    assert MIMIC_SHARE == (0.0, 0.0)
    assert TUMOUR_SLIDE_MIMIC_SHARE == (0.3, 0.5)
    for spec in (FULL_COHORT, QUICK_COHORT):
        assert spec.tumour_slide_mimic_share_range == TUMOUR_SLIDE_MIMIC_SHARE
    bare = CohortSpec(hospitals=QUICK_COHORT.hospitals)
    assert bare.mimic_share_range == (0.0, 0.0) and bare.tumour_slide_mimic_share_range is None
    # Both pool and test sites of every hospital get it: test normal tissue has mimics too.
    sites = synth_config(QUICK_COHORT).sites
    assert len(sites) == 2 * len(QUICK_COHORT.hospitals)
    assert all(site.mimic_share_range == MIMIC_SHARE for site in sites)
    assert all(site.tumour_slide_mimic_share_range == TUMOUR_SLIDE_MIMIC_SHARE for site in sites)

    # --mimic-share alone: the same share on every slide, tumour slides included.
    both = apply_share_options(parser, QUICK_COHORT, low_grade=(0.5, 0.6), mimic=(0.2, 0.4))
    assert (both.low_grade_share_range, both.mimic_share_range) == ((0.5, 0.6), (0.2, 0.4))
    assert both.tumour_slide_mimic_share_range == (0.2, 0.4)
    assert all(site.mimic_share_range == (0.2, 0.4) for site in synth_config(both).sites)
    assert all(s.tumour_slide_mimic_share_range == (0.2, 0.4) for s in synth_config(both).sites)
    tumour_only = apply_share_options(parser, QUICK_COHORT, tumour_slide_mimic=(0.1, 0.2))
    assert tumour_only.mimic_share_range == MIMIC_SHARE
    assert tumour_only.tumour_slide_mimic_share_range == (0.1, 0.2)
    assert tumour_only.synth_key() != QUICK_COHORT.synth_key()
    args = parser.parse_args(["--tumour-slide-mimic-share", "0.2,0.3"])
    assert args.tumour_slide_mimic_share == (0.2, 0.3) and args.mimic_share is None
    off = apply_share_options(parser, QUICK_COHORT, mimic=(0.0, 0.0))
    assert off.mimic_share_range == (0.0, 0.0)
    assert off.tumour_slide_mimic_share_range == (0.0, 0.0)
    assert off.low_grade_share_range == LOW_GRADE_SHARE
    assert off.synth_key() != QUICK_COHORT.synth_key()
    # The generator's bounds: at most 0.5 of the normal tissue, and an ordered range.
    for share in ((0.2, 0.6), (0.3, 0.1), (-0.1, 0.2)):
        with pytest.raises(SystemExit):
            apply_share_options(parser, QUICK_COHORT, mimic=share)
        with pytest.raises(SystemExit):
            apply_share_options(parser, QUICK_COHORT, tumour_slide_mimic=share)


@pytest.mark.parametrize(
    ("option", "value", "bound"),
    [
        ("--low-grade-share", "0.5,0.95", "0.9"),
        ("--mimic-share", "0.2,0.7", "0.5"),
        ("--tumour-slide-mimic-share", "0.2,0.7", "0.5"),
    ],
)
def test_main_refuses_a_bad_share_before_any_work(
    capsys: pytest.CaptureFixture[str], option: str, value: str, bound: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--quick", option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert option in err and bound in err


def _result(
    model: str,
    mode: str,
    seed: int,
    slide_auc_probs: float,
    patch_auc: float,
    low_grade_auc: float | None = None,
) -> RunResult:
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, slide_auc_probs, 0.6, 0.9])
    slide = slide_metrics(y, np.stack([1 - p1, p1], axis=1), bootstrap=20, seed=0)
    patch = PatchMetrics(patch_auc, patch_auc, 0.5, 100, 10, 4, 0.5)
    low = None
    if low_grade_auc is not None:
        low = PatchMetrics(low_grade_auc, low_grade_auc, 0.5, 60, 5, 4, 0.5)
    return RunResult(Arm(model, mode), seed, Evaluation(slide, patch, low), 3, 10, 1.0)


def test_summary_table_and_targets() -> None:
    results = [
        _result("clam_sb", "weak", 0, 0.2, 0.80, 0.60),
        _result("clam_sb", "weak", 1, 0.2, 0.84, 0.70),
        _result("clam_sb", "mixed", 0, 0.2, 0.95, 0.90),
        _result("clam_sb", "mixed", 1, 0.2, 0.93, 0.92),
    ]
    summaries = summarise(results)
    assert [(s.arm.mode, s.n_seeds) for s in summaries] == [("weak", 2), ("mixed", 2)]
    assert summaries[1].patch_auc[0] == pytest.approx(0.94)
    assert summaries[1].patch_auc[1] == pytest.approx(np.std([0.95, 0.93], ddof=1))
    low = summaries[0].low_grade_patch_auc
    assert low is not None and low[0] == pytest.approx(0.65)
    assert low[1] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    table = format_table(summaries).splitlines()
    assert len(table) == 4 and table[2].startswith("| clam_sb | weak | 2 | 1.0000 ± 0.0000")
    assert table[0].split(" | ")[6] == "low-grade patch AUC"
    assert table[3].split(" | ")[6] == "0.9100 ± 0.0141"
    # A uniform-tumour cohort has no low-grade patches: the column says so.
    uniform = summarise([_result("abmil", "weak", 0, 0.2, 0.8)])
    assert uniform[0].low_grade_patch_auc is None
    assert format_table(uniform).splitlines()[2].split(" | ")[6] == "n/a"
    checks = {c.name: c for c in check_targets(summaries)}
    assert checks["clam_sb mixed slide AUC"].met
    assert checks["clam_sb mixed patch AUC"].met
    gain = checks["clam_sb patch AUC mixed − weak"]
    assert gain.value == pytest.approx(0.12) and gain.met


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_tiny_cohort_gives_a_full_table(tiny_cohort: PreparedCohort) -> None:
    cohort = tiny_cohort
    assert [h.name for h in cohort.hospitals] == ["site_a", "site_b"]
    assert cohort.feature_dim == 64
    for h in cohort.hospitals:
        assert len(h.train) + len(h.val) == 4 - sum(f.startswith(h.name) for f in cohort.failed)
        assert len(h.test) == 2
    # Ground truth exists for every test slide; normal slides are all negatives. Grades agree
    # with it, and the heterogeneous tumour gives both grades in the pool and the test set.
    for e in cohort.entries("test"):
        truth = cohort.truth[e.slide_id]
        assert truth.shape == (e.num_patches,)
        if e.label != TUMOUR:
            assert (truth == 0).all()
    for split in ("train", "test"):
        grades = np.concatenate([cohort.grade[e.slide_id] for e in cohort.entries(split)])
        truth = np.concatenate([cohort.truth[e.slide_id] for e in cohort.entries(split)])
        assert ((grades == NORMAL_GRADE) == (truth == 0)).all()
        assert (truth[grades > 0] == 1).all()
        assert (grades == HIGH_GRADE).any() and (grades == LOW_GRADE).any(), split
    visible = visible_annotations(cohort, {"site_a": 1.0}, seed=0)
    data = load_cohort(cohort, visible)
    shown = {b.entry.slide_id for b in data.train if b.patch_labels is not None}
    assert shown == visible and all(b.patch_labels is None for b in data.val)
    assert all(b.patch_labels is not None for b in data.test)

    lines = describe(cohort, visible)
    assert any("tumour heterogeneity: 40%-80%" in line for line in lines)
    mimic_line = "benign mimic of low-grade tumour (ground truth: normal): 5%-15% of a normal"
    assert any(line.strip().startswith(mimic_line) for line in lines)
    assert any("5%-15% of a tumour slide's non-tumour tissue" in line for line in lines)

    ceiling = feature_ceiling(data)
    assert ceiling.n_train_patches > 0 and 0 <= ceiling.best_dim < 64
    assert 0.0 <= ceiling.probe.auc <= 1.0 and 0.0 <= ceiling.best_dim_auc <= 1.0
    low = ceiling.low_grade
    assert low is not None and 0 < low.n_train_patches < ceiling.n_train_patches
    test_grades = np.concatenate([data.grade[b.entry.slide_id] for b in data.test])
    for probe in (low.full_probe, low.high_grade_probe):
        assert probe.n_tumour == (test_grades == LOW_GRADE).sum()
        assert probe.n_labelled == np.isin(test_grades, (NORMAL_GRADE, LOW_GRADE)).sum()
        assert 0.0 <= probe.auc <= 1.0

    base = TrainConfig(epochs=2, min_epochs=0, patience=2)
    results = [run_arm(arm, 0, data, cohort.feature_dim, base, bootstrap=20) for arm in ARMS]
    summaries = summarise(results)
    assert [s.arm for s in summaries] == list(ARMS)
    for s in summaries:
        assert math.isfinite(s.slide_auc[0]) and math.isfinite(s.patch_auc[0])
        assert s.low_grade_patch_auc is not None and math.isfinite(s.low_grade_patch_auc[0])
    assert len(format_table(summaries).splitlines()) == 2 + len(ARMS)
    assert len(check_targets(summaries)) == 6

    # A second build reuses the cache: nothing is generated or embedded again.
    lines: list[str] = []
    build_cohort(TINY, cohort.root.parent, log=lines.append)
    assert "synthetic slides cached" in lines[0]
    assert all(" 0 patches embedded" in line for line in lines if "patches embedded" in line)


def test_cohort_option_names_every_full_cohort() -> None:
    parser = argparse.ArgumentParser()
    add_cohort_option(parser, default="field-effect")
    assert COHORTS[parser.parse_args([]).cohort] is FULL_COHORT
    assert COHORTS[parser.parse_args(["--cohort", "subtle"]).cohort] is SUBTLE_COHORT
    assert COHORTS[parser.parse_args(["--cohort", "low-grade"]).cohort] is LOW_GRADE_COHORT
    with pytest.raises(SystemExit):
        parser.parse_args(["--cohort", "easy"])
    keys = {spec.synth_key() for spec in (FULL_COHORT, SUBTLE_COHORT, LOW_GRADE_COHORT)}
    assert len(keys) == 3  # each its own cache


def test_low_grade_cohort_is_the_field_effect_one_with_mostly_low_grade_tumours() -> None:
    """LOW_GRADE_COHORT changes one thing of FULL_COHORT, as its docstring says: the same
    slides as ``--cohort field-effect --low-grade-share 0.8,0.9`` (one cache for both)."""
    parser = argparse.ArgumentParser()
    add_share_options(parser)
    by_option = apply_share_options(parser, FULL_COHORT, low_grade=(0.8, 0.9))
    assert by_option == LOW_GRADE_COHORT
    assert by_option.synth_key() == LOW_GRADE_COHORT.synth_key()
    differing = {
        name
        for name in CohortSpec.model_fields
        if getattr(FULL_COHORT, name) != getattr(LOW_GRADE_COHORT, name)
    }
    assert differing == {"low_grade_share_range"}
    for site in synth_config(LOW_GRADE_COHORT).sites:
        assert site.low_grade_share_range == (0.8, 0.9)
        assert site.mimic_share_range == (0.0, 0.0)  # normal slides: no mimic
        assert site.tumour_slide_mimic_share_range == TUMOUR_SLIDE_MIMIC_SHARE  # field effect


def test_accuracy_benchmark_defaults_to_the_low_grade_cohort(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 3's table is on LOW_GRADE_COHORT: ``main`` without --cohort builds that one."""
    built: list[CohortSpec] = []

    class Built(Exception):
        pass

    def stop(spec: CohortSpec, log: object = None) -> None:
        built.append(spec)
        raise Built

    monkeypatch.setattr(accuracy_module, "build_cohort", stop)
    with pytest.raises(Built):
        main([])
    assert built == [LOW_GRADE_COHORT]


def test_subtle_cohort_is_issue_4s_layout_with_mimic_on_every_slide() -> None:
    """What SUBTLE_COHORT's docstring promises, and that the generator accepts it."""
    names = [h.name for h in SUBTLE_COHORT.hospitals]
    assert names == ["site_a", "site_b", "site_c"]
    assert len({h.stain for h in SUBTLE_COHORT.hospitals}) == 3  # a stain per hospital
    pools = {h.name: h.n_pool for h in SUBTLE_COHORT.hospitals}
    assert pools["site_c"] < min(pools["site_a"], pools["site_b"])  # C is the small one
    assert sum(h.n_pool for h in SUBTLE_COHORT.hospitals) * (1 - SUBTLE_COHORT.val_share) >= 60
    assert sum(h.n_test for h in SUBTLE_COHORT.hospitals) == 50
    sites = synth_config(SUBTLE_COHORT).sites
    assert len(sites) == 6
    for site in sites:
        assert site.low_grade_share_range == (0.8, 0.9)
        assert site.tumour_fraction_range == (0.01, 0.3)
        assert site.mimic_share_range == (0.1, 0.3)  # normal slides carry the mimic too
        assert site.tumour_slide_mimic_share_range is None  # ... and tumour slides the same
