"""``fedpath local train`` / ``local eval`` end to end on a tiny synthetic prepared site."""

from __future__ import annotations

import csv
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpath.client.prepare.records import INDEX_COLUMNS
from fedpath.client.training.evaluate import load_checkpoint
from fedpath.common.featurebag import FeatureBagWriter
from fedpath.deploy.cli import main

DIM = 16
ATTRS = {
    "encoder": "test",
    "encoder_sha256": "0" * 64,
    "patch_size_px": 256,
    "target_mpp": 0.5,
    "config_sha256": "1" * 64,
    "feature_dim": DIM,
}
# 8 train, 4 val, 4 test; each split half normal, half tumour.
SPLITS = ["train"] * 8 + ["val"] * 4 + ["test"] * 4
TOML = """
[model]
hidden_dim = 16
dropout = 0.0

[train]
lr = 0.001
min_epochs = 100
patience = 100
"""


def _make_site(root: Path, *, with_site_json: bool = True) -> list[dict[str, str]]:
    """16 bags: tumour slides have their first third of patches shifted by +2 (labelled 1)."""
    rng = np.random.default_rng(0)
    (root / "features").mkdir(parents=True)
    rows: list[dict[str, str]] = []
    for i, split in enumerate(SPLITS):
        tumour = i % 2 == 1
        n = 12 + i
        feats = rng.normal(size=(n, DIM)).astype(np.float32)
        labels = np.zeros(n, dtype=np.int8)
        if tumour:
            feats[: n // 3] += 2.0
            labels[: n // 3] = 1
        annotated = i % 4 in (0, 1)
        slide_id = f"s{i:02d}"
        rel = f"features/{slide_id}.h5"
        with FeatureBagWriter(
            root / rel,
            coords=np.zeros((n, 2)),
            feature_dim=DIM,
            attrs={**ATTRS, "slide_id": slide_id},
            patch_labels=labels if annotated else None,
        ) as writer:
            writer.write(feats)
        rows.append(
            {
                "slide_id": slide_id,
                "label": "tumour" if tumour else "normal",
                "split": split,
                "patient_id": "",
                "annotation_complete": "true" if annotated else "",
                "has_patch_labels": str(annotated).lower(),
                "num_patches": str(n),
                "features": rel,
            }
        )
    with (root / "prepared.csv").open("w", newline="", encoding="utf-8") as fh:
        writer_csv = csv.DictWriter(fh, fieldnames=list(INDEX_COLUMNS), lineterminator="\n")
        writer_csv.writeheader()
        writer_csv.writerows(rows)
    if with_site_json:
        site = {"feature_dim": DIM, "labels": ["normal", "tumour"]}
        (root / "site.json").write_text(json.dumps(site), encoding="utf-8")
    (root / "train.toml").write_text(TOML, encoding="utf-8")
    return rows


@pytest.mark.slow
def test_local_train_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, run = tmp_path / "site", tmp_path / "run"
    rows = _make_site(data)
    argv = ["local", "train", "--data", str(data), "--out", str(run)]
    argv += ["--config", str(data / "train.toml"), "--epochs", "3", "--model", "clam_sb"]
    assert main(argv) == 0

    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    test_ids = [r["slide_id"] for r in rows if r["split"] == "test"]
    assert config["splits"]["test"] == test_ids
    assert config["splits"]["train"] == [r["slide_id"] for r in rows if r["split"] == "train"]
    assert config["config"]["model"]["feature_dim"] == DIM
    assert config["config"]["model"]["hidden_dim"] == 16
    assert config["config"]["train"]["epochs"] == 3
    assert config["labels"] == ["normal", "tumour"]
    payload = torch.load(run / "model.pt", weights_only=True)
    assert payload["model_config"]["kind"] == "clam_sb"
    model, model_cfg = load_checkpoint(run / "model.pt")
    assert model_cfg.feature_dim == DIM and not model.training

    eval_argv = ["local", "eval", "--data", str(data), "--run", str(run), "--split", "test"]
    assert main([*eval_argv, "--uncalibrated"]) == 0
    with (run / "predictions_test.csv").open(newline="", encoding="utf-8") as fh:
        preds = list(csv.DictReader(fh))
    assert [p["slide_id"] for p in preds] == test_ids
    assert [p["label"] for p in preds] == ["normal", "tumour", "normal", "tumour"]
    for p in preds:
        total = float(p["prob_normal"]) + float(p["prob_tumour"])
        assert total == pytest.approx(1.0, abs=1e-5)
        expected = "tumour" if float(p["prob_tumour"]) > float(p["prob_normal"]) else "normal"
        assert p["pred"] == expected
    capsys.readouterr()
    assert main(eval_argv) == 0
    assert "n/a (2 normal / 2 tumour slides; need ≥ 10" in capsys.readouterr().out
    report = json.loads((run / "eval_test.json").read_text(encoding="utf-8"))
    auc = report["slide_metrics"]["auc"]
    # 2 normal / 2 tumour test slides: no interval, and the reason instead (issue 20.15).
    assert auc["low"] is None and auc["high"] is None
    assert auc["ci_reason"] == "2 normal / 2 tumour slides; need ≥ 10 per class"
    assert report["slide_metrics"]["n_slides"] == 4
    assert report["slide_metrics"]["bootstrap"] == 1000
    # Test slides s12, s13 are annotated (i % 4 in {0, 1}): 24 + 25 labelled patches.
    patch = report["pooled_patch_metrics"]
    assert patch["n_slides"] == 2 and patch["n_labelled"] == 24 + 25
    assert patch["n_tumour"] == 25 // 3


@pytest.mark.slow
def test_eval_all_scores_every_slide(tmp_path: Path) -> None:
    data, run = tmp_path / "site", tmp_path / "run"
    _make_site(data)
    argv = ["local", "train", "--data", str(data), "--out", str(run), "--mode", "weak"]
    argv += ["--config", str(data / "train.toml"), "--epochs", "1", "--model", "abmil"]
    assert main(argv) == 0
    argv = ["local", "eval", "--data", str(data), "--run", str(run), "--split", "all"]
    assert main([*argv, "--bootstrap", "50"]) == 0
    report = json.loads((run / "eval_all.json").read_text(encoding="utf-8"))
    assert report["n_slides"] == 16
    assert report["slide_metrics"]["bootstrap"] == 50
    with (run / "predictions_all.csv").open(newline="", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == 16
    assert report["slide_metrics"]["class_counts"] == [8, 8]


def test_missing_site_json_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "site"
    _make_site(data, with_site_json=False)
    code = main(["local", "train", "--data", str(data), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "site.json is missing" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_eval_without_run_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "site"
    _make_site(data)
    assert main(["local", "eval", "--data", str(data), "--run", str(tmp_path / "nope")]) == 2
    assert "config.json is missing" in capsys.readouterr().out


def test_eval_reports_each_slide_as_it_is_scored(tmp_path: Path) -> None:
    """``evaluate_entries`` calls back once per slide, in order, with the final predictions."""
    from fedpath.client.training.evaluate import evaluate_entries
    from fedpath.client.training.site_index import load_site_index
    from fedpath.common.mil.config import ModelConfig
    from fedpath.common.mil.models import build_model

    data = tmp_path / "site"
    rows = _make_site(data)
    entries = load_site_index(data, ("normal", "tumour"))[:5]
    model = build_model(ModelConfig(feature_dim=DIM, hidden_dim=16))
    model.train()
    seen: list[tuple[str, bool]] = []
    result = evaluate_entries(
        model,
        entries,
        feature_dim=DIM,
        bootstrap=0,
        on_slide=lambda p: seen.append((p.slide_id, model.training)),
    )
    assert seen == [(r["slide_id"], False) for r in rows[:5]]  # scored in eval mode
    assert model.training  # and the mode is restored afterwards
    assert [p.slide_id for p in result.predictions] == [s for s, _ in seen]


@pytest.mark.slow
def test_eval_shows_a_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, run = tmp_path / "site", tmp_path / "run"
    _make_site(data)
    argv = ["local", "train", "--data", str(data), "--out", str(run), "--epochs", "1"]
    assert main([*argv, "--config", str(data / "train.toml")]) == 0
    capsys.readouterr()
    argv = ["local", "eval", "--data", str(data), "--run", str(run), "--bootstrap", "10"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "scoring test" in out and "4/4" in out


@pytest.mark.parametrize("with_val", [False, True])
def test_diverged_training_fails_and_saves_no_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], with_val: bool
) -> None:
    """Weights gone NaN were saved with exit 0 (no val split) or crashed validation (a val
    split): now one error naming the epoch and the learning rate, and no model.pt."""
    data, run = tmp_path / "site", tmp_path / "run"
    _make_site(data)
    if not with_val:
        index = data / "prepared.csv"
        index.write_text(index.read_text(encoding="utf-8").replace(",val,", ",train,"))
    (data / "diverge.toml").write_text("[train]\nlr = 1e30\nmin_epochs = 0\n")
    argv = ["local", "train", "--data", str(data), "--out", str(run), "--epochs", "2"]
    assert main([*argv, "--config", str(data / "diverge.toml")]) == 2
    out = capsys.readouterr().out
    assert "error: training diverged in epoch 0: the model's weights are no longer finite" in out
    assert "lower the learning rate (lr = 1e+30) or set grad_clip" in out
    assert f"{run / 'model.pt'} was not written" in out
    assert not (run / "model.pt").exists()


@pytest.mark.slow
def test_a_model_that_cannot_be_written_is_one_error_line(tmp_path: Path) -> None:
    """A full disk at model.pt was torch's traceback ("RuntimeError: … unexpected pos …")
    after the whole training; now one line naming the file and the OS error, exit 2."""
    data, run = tmp_path / "site", tmp_path / "run"
    _make_site(data)

    def limit() -> None:  # in the child only; ignored SIGXFSZ makes the write fail (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    command = [sys.executable, "-m", "fedpath.deploy.cli", "local", "train", "--data", str(data)]
    command += ["--out", str(run), "--epochs", "1", "--config", str(data / "train.toml")]
    result = subprocess.run(
        command,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "COLUMNS": "300", "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
        check=False,
    )
    text = result.stdout + result.stderr
    assert result.returncode == 2, text
    assert "Traceback" not in text
    assert f"error: cannot write {run / 'model.pt'}: File too large (EFBIG)" in text
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]  # no temporary left


@pytest.mark.slow
def test_train_says_which_epoch_was_kept_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It printed "best epoch 1 of 2: val loss n/a" for a run without val slides (nothing was
    chosen: the last weights are kept) and counted epochs from 0 ("best epoch 2 of 3" was the
    third); the patch stopping loss that chose the epoch was not shown."""
    data = tmp_path / "site"
    _make_site(data)
    toml = data / "patch.toml"
    toml.write_text(TOML.replace("[train]", '[train]\nstopping_loss = "patch"'))
    argv = ["local", "train", "--data", str(data), "--epochs", "3", "--config", str(toml)]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    # min_epochs = patience = 100: no early stop; the loss of the kept epoch is the lowest.
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kept = min(records, key=lambda r: r["val_stopping_loss"])
    assert (
        f'best epoch {kept["epoch"] + 1} of 3 ("epoch": {kept["epoch"]} in metrics.jsonl): ' in out
    )
    assert f"val patch loss {kept['val_stopping_loss']:.4f} (chose it), val slide loss " in out

    index = data / "prepared.csv"
    index.write_text(index.read_text(encoding="utf-8").replace(",val,", ",train,"))
    argv[-1] = str(data / "train.toml")
    assert main([*argv, "--out", str(tmp_path / "noval")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "no validation loss (no usable val slide): kept the weights of the last epoch 3 of 3 "
        '("epoch": 2 in metrics.jsonl); no best-epoch choice, no early stopping'
    ) in out
    assert "best epoch" not in out


@pytest.mark.slow
def test_eval_of_slides_that_were_not_held_out_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--split all` / `val` printed the same table as the test split, with no word that the
    model was trained on (or tuned on) those slides; now the screen and eval_<split>.json
    say it, and the test split has no such note."""
    data, run = tmp_path / "site", tmp_path / "run"
    _make_site(data)
    argv = ["local", "train", "--data", str(data), "--out", str(run), "--epochs", "1"]
    assert main([*argv, "--config", str(data / "train.toml")]) == 0
    capsys.readouterr()
    notes = {}
    for split in ("all", "val", "test"):
        argv = ["local", "eval", "--data", str(data), "--run", str(run), "--split", split]
        assert main([*argv, "--bootstrap", "10"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        notes[split] = json.loads((run / f"eval_{split}.json").read_text())["not_held_out"]
        assert (notes[split] is None) == ("not a held-out estimate" not in out)
    assert notes["all"] == (
        "8 of these 16 slides were trained on; 4 are val slides, which chose the kept epoch: "
        "these numbers are optimistic. `--split test` scores held-out slides."
    )
    assert notes["val"] is not None and notes["val"].startswith("4 are val slides")
    assert notes["test"] is None


def test_eval_table_title_says_which_slides_were_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a test slide skipped, the table read "test: 3 slides" as if the split had 3."""
    data, run = tmp_path / "site", tmp_path / "run"
    _make_site(data)
    argv = ["local", "train", "--data", str(data), "--out", str(run), "--epochs", "1"]
    assert main([*argv, "--config", str(data / "train.toml")]) == 0
    (data / "features" / "s13.h5").unlink()
    capsys.readouterr()
    argv = ["local", "eval", "--data", str(data), "--run", str(run), "--bootstrap", "10"]
    assert main(argv) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "test: 3 slides (2 normal / 1 tumour; 1 of 4 skipped, not scored)" in out
