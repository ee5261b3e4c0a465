"""The site-local trainer on tiny synthetic bags where tumour = a few shifted patches."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from client.training.bags import Bag
from client.training.site_index import BagEntry
from client.training.train_config import TrainConfig
from client.training.trainer import EpochMetrics, evaluate, train
from common.mil.config import ModelConfig, SupervisionConfig
from common.mil.models import MILModel, build_model

DIM = 16


def _bags(n: int, seed: int, flip: bool = False) -> list[Bag]:
    """``n`` bags, alternating normal/tumour; tumour bags have 3-8 patches shifted by +2.

    Every third tumour and every third normal bag carries complete patch labels. ``flip``
    inverts the slide labels (features unchanged): a validation set that gets worse as the
    model learns the real task.
    """
    g = torch.Generator().manual_seed(seed)
    bags: list[Bag] = []
    for i in range(n):
        label = i % 2
        size = int(torch.randint(20, 61, (1,), generator=g))
        features = torch.randn(size, DIM, generator=g)
        patch = torch.zeros(size, dtype=torch.int8)
        if label == 1:
            k = int(torch.randint(3, 9, (1,), generator=g))
            features[:k, :4] += 2.0
            patch[:k] = 1
        labelled = (i // 2) % 3 == 0
        entry = BagEntry(
            slide_id=f"s{seed}_{i}",
            label=1 - label if flip else label,
            features=Path(f"synthetic/s{i}.h5"),
            split=None,
            patient_id=None,
            has_patch_labels=labelled,
            annotation_complete=True if labelled else None,
            num_patches=size,
        )
        bags.append(Bag(entry, features, patch if labelled else None))
    return bags


TRAIN = _bags(24, seed=1)
VAL = _bags(12, seed=2)


def _model(kind: str = "clam_sb", seed: int = 0) -> MILModel:
    torch.manual_seed(seed)
    return build_model(ModelConfig(kind=kind, feature_dim=DIM, hidden_dim=32, dropout=0.25))


def _cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = {"epochs": 6, "lr": 2e-3, "min_epochs": 0, "patience": 100}
    base.update(kw)
    return TrainConfig.model_validate(base)


def _no_time(history: list[EpochMetrics]) -> list[EpochMetrics]:
    return [replace(m, seconds=0.0) for m in history]


def test_learns_easy_task_and_reports_each_epoch() -> None:
    seen: list[EpochMetrics] = []
    result = train(_model(), TRAIN, VAL, _cfg(), on_epoch=seen.append)
    hist = result.history
    assert seen == hist and [m.epoch for m in hist] == list(range(6))
    assert all(m.n_steps == 12 for m in hist)  # ceil(24 / 2) normal/tumour pairs
    assert hist[-1].train_loss < hist[0].train_loss
    assert hist[-1].val_loss < hist[0].val_loss
    assert hist[-1].val_auc >= 0.9 and hist[-1].val_patch_auc > 0.8
    assert result.n_train_slides == 24 and not result.stopped_early
    assert result.mean_train_loss_last_epoch == hist[-1].train_loss
    # The restored model is the best epoch's: re-evaluating reproduces its validation loss.
    best = min(hist, key=lambda m: m.val_loss)
    assert result.best_epoch == best.epoch
    assert evaluate(result.model, VAL).loss == pytest.approx(best.val_loss, abs=1e-12)


def test_deterministic_for_a_seed_and_leaves_global_rng_alone() -> None:
    model = _model()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = train(model, TRAIN, VAL, _cfg(epochs=3))
    assert torch.equal(torch.get_rng_state(), before)
    b = train(_model(), TRAIN, VAL, _cfg(epochs=3))
    c = train(_model(), TRAIN, VAL, _cfg(epochs=3, seed=1))
    assert _no_time(a.history) == _no_time(b.history)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _no_time(a.history) != _no_time(c.history)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_start_epoch_continues_the_same_streams() -> None:
    """Epoch e draws from (seed, e) only: a lone epoch-2 call matches epoch 2 of a longer run
    started from the same weights with a fresh optimiser (what a federated round does)."""
    cfg_one = _cfg(epochs=1)
    first = train(_model(), TRAIN, [], _cfg(epochs=2))
    weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    resumed = train(first.model, TRAIN, [], cfg_one, start_epoch=2)
    again = _model()
    again.load_state_dict(weights)
    direct = train(again, TRAIN, [], cfg_one, start_epoch=2)
    assert resumed.history[0].epoch == 2
    assert _no_time(resumed.history) == _no_time(direct.history)


def test_lr_zero_stops_after_patience_plus_one_epochs() -> None:
    result = train(_model(), TRAIN, VAL, _cfg(epochs=10, lr=0.0, patience=2))
    losses = [m.val_loss for m in result.history]
    assert len(losses) == 3 and losses[0] == losses[1] == losses[2]
    assert result.stopped_early and result.best_epoch == 0


def test_min_epochs_delays_stopping() -> None:
    result = train(_model(), TRAIN, VAL, _cfg(epochs=10, lr=0.0, patience=2, min_epochs=5))
    assert len(result.history) == 5 and result.stopped_early


def test_early_stopping_restores_best_weights() -> None:
    """Validation labels are flipped, so learning the task makes validation loss rise: the
    best epoch is an early one and its weights, not the last ones, come back."""
    val = _bags(12, seed=2, flip=True)
    result = train(_model(), TRAIN, val, _cfg(epochs=30, patience=3))
    hist = result.history
    assert result.stopped_early
    best = min(hist, key=lambda m: m.val_loss)
    assert result.best_epoch == best.epoch and len(hist) == best.epoch + 3 + 1
    assert hist[-1].val_loss > best.val_loss
    assert evaluate(result.model, val).loss == pytest.approx(best.val_loss, abs=1e-12)
    # Same weights as a run that simply stops at the best epoch (no validation: keep last).
    short = train(_model(), TRAIN, [], _cfg(epochs=best.epoch + 1))
    restored, expected = result.model.state_dict(), short.model.state_dict()
    assert all(torch.equal(restored[k], expected[k]) for k in restored)


def test_without_validation_runs_all_epochs() -> None:
    result = train(_model(), TRAIN, [], _cfg(epochs=3, patience=1))
    assert len(result.history) == 3 and result.best_epoch == 2 and not result.stopped_early
    assert all(math.isnan(m.val_loss) and math.isnan(m.val_auc) for m in result.history)


@pytest.mark.parametrize("mode", ["weak", "mixed"])
@pytest.mark.parametrize("kind", ["abmil", "clam_sb", "clam_mb"])
def test_supervision_modes_and_models_run(kind: str, mode: str) -> None:
    sup = SupervisionConfig(mode=mode, instance_loss="svm" if kind == "clam_mb" else "ce")
    result = train(_model(kind), TRAIN, VAL, _cfg(epochs=2, supervision=sup, grad_clip=1.0))
    last = result.history[-1]
    assert math.isfinite(last.train_loss) and math.isfinite(last.val_loss)
    if kind == "abmil":
        assert all(m.train_instance_loss == 0.0 for m in result.history)
    else:
        assert all(m.train_instance_loss > 0.0 for m in result.history)
    if mode == "weak":
        assert all(m.train_attention_loss == 0.0 for m in result.history)
    else:  # normal slides always contribute −H̃(A) < 0
        assert all(m.train_attention_loss < 0.0 for m in result.history)


def test_steps_per_epoch_and_model_mode_restored() -> None:
    model = _model()
    model.eval()
    result = train(model, TRAIN, VAL, _cfg(epochs=1, steps_per_epoch=3))
    assert result.history[0].n_steps == 3 and not model.training


def test_to_json_is_strict_json() -> None:
    m = EpochMetrics(0, 1.5, 1.0, 0.25, -0.5, math.nan, math.nan, math.nan, 0.1, 4)
    data = m.to_json()
    assert data["val_loss"] is None and data["val_patch_auc"] is None and data["train_loss"] == 1.5
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    real = train(_model(), TRAIN, VAL, _cfg(epochs=1)).history[0].to_json()
    json.dumps(real, allow_nan=False)


def test_evaluate_single_class_gives_nan_auc() -> None:
    normals = [b for b in VAL if b.entry.label == 0 and b.patch_labels is None]
    metrics = evaluate(_model(), normals)
    assert math.isnan(metrics.auc) and math.isnan(metrics.patch_auc)
    assert metrics.loss > 0


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": 0},
        {"lr": -1e-3},
        {"weight_decay": -1.0},
        {"patience": 0},
        {"min_epochs": -1},
        {"seed": -1},
        {"steps_per_epoch": 0},
        {"grad_clip": 0.0},
        {"learning_rate": 1e-3},
    ],
)
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        TrainConfig.model_validate(bad)


def test_config_defaults_follow_design() -> None:
    cfg = TrainConfig()
    assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.patience, cfg.min_epochs) == (
        200,
        2e-4,
        1e-5,
        20,
        50,
    )
    assert cfg.steps_per_epoch is None and cfg.grad_clip is None
    assert cfg.supervision == SupervisionConfig()


def test_rejects_empty_training_set() -> None:
    with pytest.raises(ValueError, match="no training bags"):
        train(_model(), [], VAL, _cfg())
