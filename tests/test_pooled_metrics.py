"""Pooled means pooled (issue 20.16) and the federated model's calibration (issue 20.17).

A real 2-round run of the round loop and the ClientApp in process over three synthetic sites;
then the final model is scored here, with every site's slides and patches in one place, and
``final.json`` must say what that gives: the slide and patch AUC over all test slides and
patches (within the tie bound it reports), the temperature and threshold fitted on all
validation slides, and the calibrated test accuracy and ECE over all test slides.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from fedpath.client.federated import load_global_model, load_splits
from fedpath.client.training.evaluate import evaluate_entries
from fedpath.common.calibration import fit_calibration, scaled_probs
from fedpath.common.federation import RoundInstructions
from fedpath.common.probability_scores import expected_calibration_error
from fedpath.deploy.inprocess_grid import InProcessGrid, InProcessSite
from fedpath.server.checkpoints import latest_checkpoint, load_checkpoint
from fedpath.server.config import RunConfig
from fedpath.server.federated_run import run_federated
from fedpath.synthetic.site import SyntheticSiteSpec, write_synthetic_site

pytestmark = pytest.mark.usefixtures("flower_task")

SPEC = SyntheticSiteSpec(n_slides=40, feature_dim=16, patches=(10, 30), site_shift=2.0)


def _scored(sites: dict[str, Path], cfg: RunConfig, run_dir: Path) -> dict[str, dict]:
    """Every site's val and test slides scored by the final model, here in one process."""
    state = load_checkpoint(latest_checkpoint(run_dir)).arrays
    instructions = RoundInstructions(
        server_round=cfg.num_server_rounds,
        model=cfg.model_config_for(SPEC.feature_dim),
        train=cfg.train_config(),
        split_folds=cfg.split_folds,
        split_fold=cfg.split_fold,
        split_seed=cfg.seed,
        labels=cfg.label_names,
    )
    model = load_global_model(instructions, state)
    out: dict[str, dict] = {}
    for site, path in sites.items():
        splits = load_splits(path, instructions)
        out[site] = {
            "val": evaluate_entries(model, splits.val, bootstrap=0).predictions,
            "test": evaluate_entries(model, splits.test, bootstrap=0).predictions,
        }
    return out


@pytest.mark.slow
def test_global_test_is_over_all_slides_and_patches_and_calibrated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "sites"
    sites = {f"site_{n}": write_synthetic_site(root / n, SPEC, seed=i) for i, n in enumerate("abc")}
    grid = InProcessGrid(
        {10 + i: InProcessSite(path, name) for i, (name, path) in enumerate(sorted(sites.items()))}
    )
    cfg = RunConfig.from_run_config(
        {
            "num-server-rounds": 2,
            "local-epochs": 1,
            "lr": 1e-3,
            "runs-dir": str(tmp_path / "runs"),
            "run-name": "pooled",
            "connect-timeout": 1.0,
        }
    )
    caplog.set_level(logging.INFO, logger="fedpath.server")
    run_dir = run_federated(grid, cfg, flwr_run_id=1)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("fedpath.server")]
    final = json.loads((run_dir / "final.json").read_text(encoding="utf-8"))
    assert final["status"] == "completed"
    pooled = final["global_test"]
    scored = _scored(sites, cfg, run_dir)

    test = [p for s in scored.values() for p in s["test"]]
    y = np.array([p.label for p in test])
    logits = np.stack([p.slide_logits() for p in test])
    truth_auc = roc_auc_score(y, logits[:, 1] - logits[:, 0])
    assert pooled["num_examples"] == len(test) == 24
    assert abs(pooled["auc"] - truth_auc) <= pooled["auc_tie_share"] / 2 + 1e-12

    labels = np.concatenate([p.patch_labels for p in test])
    probs = np.concatenate([p.patch_tumour_prob for p in test])
    keep = labels != -1
    truth_patch_auc = roc_auc_score(labels[keep], probs[keep])
    assert pooled["patch_n_labelled"] == int(keep.sum())
    assert 0 <= pooled["patch_auc_tie_share"] < 0.05
    assert abs(pooled["patch_auc"] - truth_patch_auc) <= pooled["patch_auc_tie_share"] / 2 + 1e-12
    # What final.json called the pooled patch AUC before: the sites' test-slide-weighted mean.
    site_mean = sum(m["patch_auc"] * m["num_examples"] for m in final["test"].values()) / sum(
        m["num_examples"] for m in final["test"].values()
    )
    assert pooled["patch_auc_site_mean"] == pytest.approx(site_mean)
    assert abs(site_mean - truth_patch_auc) > pooled["patch_auc_tie_share"] / 2

    # The calibration is what all validation slides together give.
    val = [p for s in scored.values() for p in s["val"]]
    expected = fit_calibration(
        np.stack([p.slide_logits() for p in val]), np.array([p.label for p in val])
    )
    calibration = final["calibration"]
    assert calibration["fitted"] is True and calibration["n_slides"] == len(val) == 24
    assert calibration["temperature"] == pytest.approx(expected.temperature, rel=1e-6)
    assert calibration["threshold"] == pytest.approx(expected.threshold, rel=1e-6)
    assert any(m.startswith("calibration of the final model: temperature T = ") for m in messages)

    calibrated = scaled_probs(logits, calibration["temperature"])
    decided = (calibrated[:, 1] >= calibration["threshold"]).astype(int)
    assert pooled["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, decided))
    assert pooled["ece"] == pytest.approx(expected_calibration_error(y, calibrated))
    # Each round's "global" validation AUC is over all sites' validation slides too.
    last = json.loads((run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    val_logits = np.stack([p.slide_logits() for p in val])
    truth_val_auc = roc_auc_score([p.label for p in val], val_logits[:, 1] - val_logits[:, 0])
    assert last["global"]["val_auc"] == pytest.approx(truth_val_auc, abs=0.05)
    assert "val_auc_site_mean" in last["global"]
    # 12 slides of each class: the pooled intervals exist and hold the estimate.
    assert pooled["auc_low"] <= pooled["auc"] <= pooled["auc_high"]
    assert pooled["balanced_accuracy_low"] <= pooled["balanced_accuracy"]
    assert pooled["auc_ci"].startswith("Newcombe")
