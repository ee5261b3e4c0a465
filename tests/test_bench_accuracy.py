"""The accuracy benchmark's reusable parts: ground truth from masks, splits, label visibility,
and the whole cohort → train → table path on a tiny cohort with the ``tiny_cnn`` encoder."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.accuracy import (
    ARMS,
    TUMOUR,
    Arm,
    CohortSpec,
    Evaluation,
    Hospital,
    HospitalSpec,
    PreparedCohort,
    RunResult,
    annotated_share,
    build_cohort,
    check_targets,
    feature_ceiling,
    format_table,
    load_cohort,
    mask_patch_fraction,
    run_arm,
    summarise,
    validation_split,
    visible_annotations,
)
from client.training.site_index import BagEntry
from client.training.train_config import TrainConfig
from common.metrics import PatchMetrics, slide_metrics


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


def _cohort(train: list[BagEntry], name: str = "site_a") -> PreparedCohort:
    spec = CohortSpec(hospitals=(HospitalSpec(name=name, n_pool=len(train), n_test=2),))
    hospital = Hospital(name, tuple(train), (), ())
    return PreparedCohort(spec, Path("/nonexistent"), (hospital,), {}, {}, 64)


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


def _result(
    model: str, mode: str, seed: int, slide_auc_probs: float, patch_auc: float
) -> RunResult:
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, slide_auc_probs, 0.6, 0.9])
    slide = slide_metrics(y, np.stack([1 - p1, p1], axis=1), bootstrap=20, seed=0)
    patch = PatchMetrics(patch_auc, patch_auc, 0.5, 100, 10, 4, 0.5)
    return RunResult(Arm(model, mode), seed, Evaluation(slide, patch), 3, 10, 1.0)


def test_summary_table_and_targets() -> None:
    results = [
        _result("clam_sb", "weak", 0, 0.2, 0.80),
        _result("clam_sb", "weak", 1, 0.2, 0.84),
        _result("clam_sb", "mixed", 0, 0.2, 0.95),
        _result("clam_sb", "mixed", 1, 0.2, 0.93),
    ]
    summaries = summarise(results)
    assert [(s.arm.mode, s.n_seeds) for s in summaries] == [("weak", 2), ("mixed", 2)]
    assert summaries[1].patch_auc[0] == pytest.approx(0.94)
    assert summaries[1].patch_auc[1] == pytest.approx(np.std([0.95, 0.93], ddof=1))
    table = format_table(summaries).splitlines()
    assert len(table) == 4 and table[2].startswith("| clam_sb | weak | 2 | 1.0000 ± 0.0000")
    checks = {c.name: c for c in check_targets(summaries)}
    assert checks["clam_sb mixed slide AUC"].met
    assert checks["clam_sb mixed patch AUC"].met
    gain = checks["clam_sb patch AUC mixed − weak"]
    assert gain.value == pytest.approx(0.12) and gain.met


TINY = CohortSpec(
    hospitals=tuple(
        HospitalSpec(
            name=name,
            stain=stain,
            n_pool=4,
            n_test=2,
            width_range=(1536, 1792),
            height_range=(1280, 1536),
        )
        for name, stain in (("h1", "reference"), ("h2", "purple"))
    ),
    tumour_fraction_range=(0.2, 0.6),
    encoder="tiny_cnn",
    bank_size=256,
)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny forward passes split over threads only wait on each other (see bench/accuracy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_tiny_cohort_gives_a_full_table(tmp_path: Path) -> None:
    cohort = build_cohort(TINY, tmp_path)
    assert [h.name for h in cohort.hospitals] == ["h1", "h2"]
    assert cohort.feature_dim == 64
    for h in cohort.hospitals:
        assert len(h.train) + len(h.val) == 4 - sum(f.startswith(h.name) for f in cohort.failed)
        assert len(h.test) == 2
    # Ground truth exists for every test slide; normal slides are all negatives.
    for e in cohort.entries("test"):
        truth = cohort.truth[e.slide_id]
        assert truth.shape == (e.num_patches,)
        if e.label != TUMOUR:
            assert (truth == 0).all()
    visible = visible_annotations(cohort, {"h1": 1.0}, seed=0)
    data = load_cohort(cohort, visible)
    shown = {b.entry.slide_id for b in data.train if b.patch_labels is not None}
    assert shown == visible and all(b.patch_labels is None for b in data.val)
    assert all(b.patch_labels is not None for b in data.test)

    ceiling = feature_ceiling(data)
    assert ceiling.n_train_patches > 0 and 0 <= ceiling.best_dim < 64
    assert 0.0 <= ceiling.probe.auc <= 1.0 and 0.0 <= ceiling.best_dim_auc <= 1.0

    base = TrainConfig(epochs=2, min_epochs=0, patience=2)
    results = [run_arm(arm, 0, data, cohort.feature_dim, base, bootstrap=20) for arm in ARMS]
    summaries = summarise(results)
    assert [s.arm for s in summaries] == list(ARMS)
    for s in summaries:
        assert math.isfinite(s.slide_auc[0]) and math.isfinite(s.patch_auc[0])
    assert len(format_table(summaries).splitlines()) == 2 + len(ARMS)
    assert len(check_targets(summaries)) == 6

    # A second build reuses the cache: nothing is generated or embedded again.
    lines: list[str] = []
    build_cohort(TINY, tmp_path, log=lines.append)
    assert "synthetic slides cached" in lines[0]
    assert all(" 0 patches embedded" in line for line in lines if "patches embedded" in line)
