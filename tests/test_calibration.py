"""Post-hoc calibration (issue 20.17) and metrics from aggregate counts (issue 20.16).

Unit level: temperature fitted on the NLL grid recovers a known temperature, the threshold
maximises balanced accuracy, histogram AUCs match scikit-learn within the tie bound they
report, and too few validation slides leave a model uncalibrated with the reason. CLI level:
a site whose validation and test slides are shifted (another stain: every slide scores high,
balanced accuracy 0.5 at AUC 1) is calibrated by ``local train`` and ``local eval`` applies it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from fedpath.client.prepare.records import INDEX_COLUMNS
from fedpath.common.calibration import (
    SCORE_EDGES,
    TEMPERATURES,
    auc_from_histograms,
    calibration_from_aggregates,
    confusion_at_cut,
    cut_from_histograms,
    fit_calibration,
    fit_temperature,
    nll_on_grid,
    scaled_probs,
    score_histogram,
)
from fedpath.common.featurebag import FeatureBagWriter
from fedpath.deploy.cli import main
from tests.test_cli_local import ATTRS, DIM, TOML


def _binary_logits(d: np.ndarray) -> np.ndarray:
    return np.stack([np.zeros_like(d), d], axis=1)


def test_the_temperature_of_an_overconfident_model_is_recovered() -> None:
    """Labels drawn from sigmoid(d); the model reports 3·d: the fitted T is close to 3."""
    rng = np.random.default_rng(0)
    d = rng.normal(scale=2.0, size=4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-d))).astype(np.int64)
    t, at_bound = fit_temperature(nll_on_grid(_binary_logits(3.0 * d), y))
    assert not at_bound and t == pytest.approx(3.0, rel=0.08)
    # The refined value is no worse than the best grid point.
    best_grid = min(TEMPERATURES, key=lambda x: abs(x - 3.0))
    assert abs(t - 3.0) <= abs(best_grid - 3.0) + 1e-9


def test_histogram_auc_matches_sklearn_within_its_tie_bound() -> None:
    rng = np.random.default_rng(1)
    d = rng.normal(size=3000)
    y = (d + rng.normal(size=3000) > 0).astype(np.int64)
    auc, ties = auc_from_histograms(score_histogram(d[y == 1]), score_histogram(d[y == 0]))
    exact = roc_auc_score(y, d)
    assert 0 < ties < 0.05
    assert abs(auc - exact) <= ties / 2 + 1e-12
    assert auc == pytest.approx(exact, abs=0.002)


def test_histograms_add_up_to_the_pooled_auc() -> None:
    """Two sites' counts summed give the AUC over both sites' slides, not a mean of AUCs."""
    rng = np.random.default_rng(2)
    site_a = rng.normal(loc=1.0, size=400), rng.integers(0, 2, size=400)
    site_b = rng.normal(loc=-1.0, size=300), rng.integers(0, 2, size=300)
    da, ya = site_a[0] + 0.8 * site_a[1], site_a[1]
    db, yb = site_b[0] + 0.8 * site_b[1], site_b[1]
    pos = score_histogram(da[ya == 1]) + score_histogram(db[yb == 1])
    neg = score_histogram(da[ya == 0]) + score_histogram(db[yb == 0])
    auc, ties = auc_from_histograms(pos, neg)
    pooled = roc_auc_score(np.concatenate([ya, yb]), np.concatenate([da, db]))
    mean_of_sites = (400 * roc_auc_score(ya, da) + 300 * roc_auc_score(yb, db)) / 700
    assert abs(auc - pooled) <= ties / 2 + 1e-12
    assert abs(pooled - mean_of_sites) > 0.02  # the two really differ here


def test_the_threshold_maximises_balanced_accuracy_and_sits_in_the_gap() -> None:
    # Issue 20.17: every slide at 0.85-0.94, perfectly ranked; argmax calls all tumour.
    p1 = np.array([0.85, 0.86, 0.87, 0.88, 0.885, 0.90, 0.91, 0.92, 0.93, 0.94])
    y = np.array([0] * 5 + [1] * 5)
    d = np.log(p1 / (1 - p1))
    cut = cut_from_histograms(score_histogram(d[y == 1]), score_histogram(d[y == 0]))
    assert cut is not None and d[4] < cut <= d[5]
    assert balanced_accuracy_score(y, (d >= cut).astype(int)) == 1.0
    tp, fn, tn, fp = confusion_at_cut(score_histogram(d[y == 1]), score_histogram(d[y == 0]), cut)
    assert (tp, fn, tn, fp) == (5, 0, 5, 0)
    with pytest.raises(ValueError, match="not an edge"):
        confusion_at_cut(score_histogram(d[y == 1]), score_histogram(d[y == 0]), 0.123)
    # The calibrated threshold is the same decision in probability space.
    cal = fit_calibration(_binary_logits(d), y)
    assert cal.fitted and cal.threshold is not None
    probs = scaled_probs(_binary_logits(d), cal.temperature)[:, 1]
    assert balanced_accuracy_score(y, (probs >= cal.threshold).astype(int)) == 1.0


def test_too_few_validation_slides_leave_the_model_uncalibrated_and_say_why() -> None:
    d = np.array([-1.0, 1.0, -2.0, 2.0])
    y = np.array([0, 1, 0, 1])
    cal = fit_calibration(_binary_logits(d), y, ("normal", "tumour"))
    assert not cal.fitted and cal.temperature == 1.0 and cal.threshold is None
    assert cal.reason == "2 normal / 2 tumour validation slides; need ≥ 5 per class"
    assert cal.describe().startswith("uncalibrated (T = 1, argmax): 2 normal / 2 tumour")


def test_separated_at_the_argmax_keeps_t_1_instead_of_sharpening_to_the_bound() -> None:
    d = np.array([-2.0, -1.5, -1.0, -0.8, -0.5, 0.5, 0.9, 1.0, 1.8, 2.5])
    y = np.array([0] * 5 + [1] * 5)
    assert fit_temperature(nll_on_grid(_binary_logits(d), y)) == (TEMPERATURES[0], True)
    cal = fit_calibration(_binary_logits(d), y)
    assert cal.fitted and cal.temperature == 1.0 and not cal.temperature_at_bound
    assert cal.reason is not None and "T stays 1" in cal.reason


def test_aggregates_from_sites_give_the_same_calibration_as_one_site() -> None:
    rng = np.random.default_rng(4)
    d = rng.normal(scale=3.0, size=60) + 1.5
    y = (d + rng.normal(scale=2.0, size=60) > 1.5).astype(np.int64)
    z = _binary_logits(d)
    whole = fit_calibration(z, y)
    parts = [(z[:25], y[:25]), (z[25:], y[25:])]
    nll = sum(nll_on_grid(zz, yy) for zz, yy in parts)
    pos = sum(score_histogram(zz[yy == 1, 1]) for zz, yy in parts)
    neg = sum(score_histogram(zz[yy == 0, 1]) for zz, yy in parts)
    counts = np.bincount(y, minlength=2).tolist()
    federated = calibration_from_aggregates(nll, pos, neg, counts)
    assert federated.temperature == pytest.approx(whole.temperature, rel=1e-9)
    assert federated.threshold == pytest.approx(whole.threshold, rel=1e-9)
    assert len(SCORE_EDGES) == 201


# -- CLI: local train fits, local eval applies ------------------------------------------------


def _shifted_site(root: Path, shift: float) -> None:
    """Training slides as usual; validation and test slides all shifted by ``shift``."""
    rng = np.random.default_rng(0)
    (root / "features").mkdir(parents=True)
    splits = ["train"] * 16 + ["val"] * 10 + ["test"] * 10
    rows = []
    for i, split in enumerate(splits):
        tumour = i % 2 == 1
        n = 12 + i % 7
        feats = rng.normal(size=(n, DIM)).astype(np.float32)
        if tumour:
            feats[: n // 3] += 2.0
        if split != "train":
            feats += shift
        slide_id = f"s{i:02d}"
        rel = f"features/{slide_id}.h5"
        with FeatureBagWriter(
            root / rel,
            coords=np.zeros((n, 2)),
            feature_dim=DIM,
            attrs={**ATTRS, "slide_id": slide_id},
        ) as writer:
            writer.write(feats)
        rows.append(
            {
                "slide_id": slide_id,
                "label": "tumour" if tumour else "normal",
                "split": split,
                "patient_id": "",
                "annotation_complete": "",
                "has_patch_labels": "false",
                "num_patches": str(n),
                "features": rel,
            }
        )
    with (root / "prepared.csv").open("w", newline="", encoding="utf-8") as fh:
        writer_csv = csv.DictWriter(fh, fieldnames=list(INDEX_COLUMNS), lineterminator="\n")
        writer_csv.writeheader()
        writer_csv.writerows(rows)
    site = {"feature_dim": DIM, "labels": ["normal", "tumour"]}
    (root / "site.json").write_text(json.dumps(site), encoding="utf-8")
    (root / "train.toml").write_text(TOML, encoding="utf-8")


@pytest.mark.slow
def test_local_train_calibrates_a_shifted_site_and_eval_applies_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = tmp_path / "site", tmp_path / "run"
    _shifted_site(data, 1.0)
    argv = ["local", "train", "--data", str(data), "--out", str(run), "--mode", "weak"]
    assert main([*argv, "--config", str(data / "train.toml"), "--epochs", "10"]) == 0
    out = capsys.readouterr().out
    assert "calibration on the val split: temperature T = " in out
    stored = torch.load(run / "model.pt", weights_only=True)["calibration"]
    assert stored["fitted"] and stored["n_slides"] == 10 and stored["threshold"] is not None

    assert main(["local", "eval", "--data", str(data), "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "* calibrated on the val split: temperature T = " in out
    assert "uncalibrated (T = 1, argmax): balanced accuracy 0.5000" in out
    report = json.loads((run / "eval_test.json").read_text(encoding="utf-8"))
    assert report["calibrated"] is True
    assert report["calibration"]["temperature"] == pytest.approx(stored["temperature"])
    raw, cal = report["slide_metrics_uncalibrated"], report["slide_metrics"]
    # Every test slide scored tumour at the argmax; the validation threshold separates them.
    assert raw["auc"]["value"] == 1.0 and raw["balanced_accuracy"]["value"] == 0.5
    assert cal["balanced_accuracy"]["value"] == 1.0 and cal["threshold"] is not None
    assert cal["auc"]["value"] == raw["auc"]["value"]  # a temperature keeps the ranking
    assert math.isfinite(cal["brier"]) and cal["brier"] < raw["brier"]
    with (run / "predictions_test.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["pred"] for r in rows] == [r["label"] for r in rows]
    assert {"raw_prob_normal", "raw_prob_tumour"} <= set(rows[0])
    assert all(r["prob_tumour"] != r["raw_prob_tumour"] for r in rows)


@pytest.mark.slow
def test_eval_of_a_model_saved_without_calibration_says_it_is_uncalibrated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model.pt of an older fedpath has no calibration: eval must not pretend otherwise."""
    data, run = tmp_path / "site", tmp_path / "run"
    _shifted_site(data, 0.0)
    argv = ["local", "train", "--data", str(data), "--out", str(run), "--epochs", "1"]
    assert main([*argv, "--config", str(data / "train.toml")]) == 0
    payload = torch.load(run / "model.pt", weights_only=True)
    del payload["calibration"]
    torch.save(payload, run / "model.pt")
    capsys.readouterr()
    assert main(["local", "eval", "--data", str(data), "--run", str(run)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "uncalibrated: this model.pt holds no calibration" in out
    assert "*" not in out.split("wrote")[0].replace("**", "")
    report = json.loads((run / "eval_test.json").read_text(encoding="utf-8"))
    assert report["calibrated"] is False and report["slide_metrics_uncalibrated"] is None
