"""The site-local trainer on tiny synthetic bags where tumour = a few shifted patches."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fedpath.client.training import trainer
from fedpath.client.training.bags import Bag
from fedpath.client.training.trainer import (
    EpochMetrics,
    evaluate,
    physical_batches,
    resolve_precision,
    step_lr,
    train,
)
from fedpath.common.mil import models
from fedpath.common.mil.config import SupervisionConfig
from fedpath.common.mil.models import MaskDropout, Tanh
from fedpath.common.train_config import TrainConfig
from tests.trainer_data import TRAIN, VAL, forward_lengths, toy_bags, toy_model, train_cfg


def _no_time(history: list[EpochMetrics]) -> list[EpochMetrics]:
    return [replace(m, seconds=0.0) for m in history]


@pytest.mark.slow
def test_learns_easy_task_and_reports_each_epoch() -> None:
    seen: list[EpochMetrics] = []
    result = train(toy_model(), TRAIN, VAL, train_cfg(), on_epoch=seen.append)
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
    assert evaluate(result.model, VAL, result.precision).loss == pytest.approx(
        best.val_loss, abs=1e-12
    )


@pytest.mark.slow
def test_deterministic_for_a_seed_and_leaves_global_rng_alone() -> None:
    model = toy_model()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = train(model, TRAIN, VAL, train_cfg(epochs=3))
    assert torch.equal(torch.get_rng_state(), before)
    b = train(toy_model(), TRAIN, VAL, train_cfg(epochs=3))
    c = train(toy_model(), TRAIN, VAL, train_cfg(epochs=3, seed=1))
    assert _no_time(a.history) == _no_time(b.history)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _no_time(a.history) != _no_time(c.history)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.slow
def test_start_epoch_continues_the_same_streams() -> None:
    """Epoch e draws from (seed, e) only: a lone epoch-2 call matches epoch 2 of a longer run
    started from the same weights with a fresh optimiser (what a federated round does)."""
    cfg_one = train_cfg(epochs=1)
    first = train(toy_model(), TRAIN, [], train_cfg(epochs=2))
    weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    resumed = train(first.model, TRAIN, [], cfg_one, start_epoch=2)
    again = toy_model()
    again.load_state_dict(weights)
    direct = train(again, TRAIN, [], cfg_one, start_epoch=2)
    assert resumed.history[0].epoch == 2
    assert _no_time(resumed.history) == _no_time(direct.history)


@pytest.mark.slow
def test_lr_zero_stops_after_patience_plus_one_epochs() -> None:
    result = train(toy_model(), TRAIN, VAL, train_cfg(epochs=10, lr=0.0, patience=2))
    losses = [m.val_loss for m in result.history]
    assert len(losses) == 3 and losses[0] == losses[1] == losses[2]
    assert result.stopped_early and result.best_epoch == 0


@pytest.mark.slow
def test_min_epochs_delays_stopping() -> None:
    result = train(toy_model(), TRAIN, VAL, train_cfg(epochs=10, lr=0.0, patience=2, min_epochs=5))
    assert len(result.history) == 5 and result.stopped_early


@pytest.mark.slow
def test_early_stopping_restores_best_weights() -> None:
    """Validation labels are flipped, so learning the task makes validation loss rise: the
    best epoch is an early one and its weights, not the last ones, come back."""
    val = toy_bags(12, seed=2, flip=True)
    result = train(toy_model(), TRAIN, val, train_cfg(epochs=30, patience=3))
    hist = result.history
    assert result.stopped_early
    best = min(hist, key=lambda m: m.val_loss)
    assert result.best_epoch == best.epoch and len(hist) == best.epoch + 3 + 1
    assert hist[-1].val_loss > best.val_loss
    assert evaluate(result.model, val, result.precision).loss == pytest.approx(
        best.val_loss, abs=1e-12
    )
    # Same weights as a run that simply stops at the best epoch (no validation: keep last).
    short = train(toy_model(), TRAIN, [], train_cfg(epochs=best.epoch + 1))
    restored, expected = result.model.state_dict(), short.model.state_dict()
    assert all(torch.equal(restored[k], expected[k]) for k in restored)


def test_without_validation_runs_all_epochs() -> None:
    result = train(toy_model(), TRAIN, [], train_cfg(epochs=3, patience=1))
    assert len(result.history) == 3 and result.best_epoch == 2 and not result.stopped_early
    assert all(math.isnan(m.val_loss) and math.isnan(m.val_auc) for m in result.history)


@pytest.mark.parametrize("mode", ["weak", "mixed"])
@pytest.mark.parametrize("kind", ["abmil", "clam_sb", "clam_mb"])
def test_supervision_modes_and_models_run(kind: str, mode: str) -> None:
    sup = SupervisionConfig(mode=mode, instance_loss="svm" if kind == "clam_mb" else "ce")
    result = train(toy_model(kind), TRAIN, VAL, train_cfg(epochs=2, supervision=sup, grad_clip=1.0))
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
    model = toy_model()
    model.eval()
    result = train(model, TRAIN, VAL, train_cfg(epochs=1, steps_per_epoch=3))
    assert result.history[0].n_steps == 3 and not model.training


def test_to_json_is_strict_json() -> None:
    m = EpochMetrics(0, 1.5, 1.0, 0.25, -0.5, math.nan, math.nan, math.nan, 0.1, 4)
    data = m.to_json()
    assert data["val_loss"] is None and data["val_patch_auc"] is None and data["train_loss"] == 1.5
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    real = train(toy_model(), TRAIN, VAL, train_cfg(epochs=1)).history[0].to_json()
    json.dumps(real, allow_nan=False)


def test_evaluate_single_class_gives_nan_auc() -> None:
    normals = [b for b in VAL if b.entry.label == 0 and b.patch_labels is None]
    metrics = evaluate(toy_model(), normals)
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
        {"precision": "float16"},
        {"lr_scaling": "cubic"},
        {"max_batch_patches": 0},
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
    assert cfg.precision == "auto" and cfg.max_batch_patches == 8192
    assert cfg.max_train_patches == 2048  # not in DESIGN: bench/training.py's speed-up
    assert cfg.lr_scaling == "sqrt"


def test_rejects_empty_training_set() -> None:
    with pytest.raises(ValueError, match="no training bags"):
        train(toy_model(), [], VAL, train_cfg())


# --- performance options: forward passes per step, precision -------------------------------


def test_physical_batches_pack_longest_first_within_the_budget() -> None:
    assert physical_batches([30, 50, 10, 40], 100) == [[1, 3], [0, 2]]  # 2x50, then 2x30
    assert physical_batches([30, 50, 10, 40], 10_000) == [[1, 3, 0, 2]]
    assert physical_batches([5000, 7000], 8192) == [[1], [0]]  # real slides run alone
    assert physical_batches([9000], 10) == [[0]]  # longer than the budget: alone, unpadded
    assert physical_batches([4, 4, 4], 8) == [[0, 1], [2]]  # ties keep their order
    assert physical_batches([], 8) == []
    with pytest.raises(ValueError, match="max_patches"):
        physical_batches([3], 0)


def test_steps_split_into_passes_equal_one_padded_batch() -> None:
    """A step's gradient is the mean over its slides however they are split into forward
    passes: every slide alone (unpadded) gives the same training as one padded batch."""
    cfg = {"epochs": 2, "precision": "float32", "steps_per_epoch": 5}
    alone = train(toy_model(dropout=0.0), TRAIN, VAL, train_cfg(max_batch_patches=1, **cfg))
    padded = train(toy_model(dropout=0.0), TRAIN, VAL, train_cfg(max_batch_patches=10_000, **cfg))
    for a, b in zip(alone.history, padded.history, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-5)
    sa, sb = alone.model.state_dict(), padded.model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)


def test_auto_precision_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer, "fast_bf16_cpu", lambda: False)
    assert resolve_precision("auto", cpu) == "float32"
    assert resolve_precision("bfloat16", cpu) == "bfloat16"  # asked for explicitly
    result = train(toy_model(), TRAIN, [], train_cfg(epochs=1))
    assert result.precision == "float32"
    pinned = train(toy_model(), TRAIN, [], train_cfg(epochs=1, precision="float32"))
    assert _no_time(result.history) == _no_time(pinned.history)  # no silent change
    monkeypatch.setattr(trainer, "fast_bf16_cpu", lambda: True)
    assert resolve_precision("auto", cpu) == "bfloat16"
    assert resolve_precision("float32", cpu) == "float32"
    assert train(toy_model(), TRAIN, [], train_cfg(epochs=1)).precision == "bfloat16"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("float16", cpu)


def test_auto_precision_on_a_gpu_is_its_native_low_precision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bfloat16 where the GPU computes it natively; else float16 for the plain trainer and
    float32 for DP-SGD, whose per-slide gradients cannot be loss-scaled; MPS keeps float32."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(trainer, "cuda_bf16", lambda device: True)
    assert resolve_precision("auto", cuda) == "bfloat16"
    assert resolve_precision("auto", cuda, private=True) == "bfloat16"
    monkeypatch.setattr(trainer, "cuda_bf16", lambda device: False)
    assert resolve_precision("auto", cuda) == "float16"
    assert resolve_precision("auto", cuda, private=True) == "float32"
    assert resolve_precision("float32", cuda) == "float32"  # asked for explicitly
    assert resolve_precision("auto", torch.device("mps")) == "float32"


@pytest.mark.slow
def test_bfloat16_training_tracks_float32() -> None:
    """bfloat16 autocast covers the per-patch layers only: outputs that feed the losses stay
    float32, and a short run learns the same as in float32."""
    model = toy_model(dropout=0.0).eval()
    features = TRAIN[1].features.unsqueeze(0)
    reference = model(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(features)
    for name in ("logits", "attention", "attention_scores", "instance_logits", "embeddings"):
        got, want = getattr(out, name), getattr(reference, name)
        assert got.dtype == torch.float32, name
        assert torch.allclose(got, want, atol=0.05, rtol=0.05), name
    cfg = train_cfg(epochs=4)
    fp32 = train(toy_model(), TRAIN, VAL, cfg.model_copy(update={"precision": "float32"}))
    bf16 = train(toy_model(), TRAIN, VAL, cfg.model_copy(update={"precision": "bfloat16"}))
    assert bf16.precision == "bfloat16" and fp32.precision == "float32"
    for a, b in zip(fp32.history, bf16.history, strict=True):
        assert b.train_loss == pytest.approx(a.train_loss, abs=0.03)
        assert b.val_loss == pytest.approx(a.val_loss, abs=0.03)
    assert bf16.history[-1].val_auc >= 0.9


@pytest.mark.slow
def test_step_size_scales_with_the_slides_of_a_step() -> None:
    """lr is per slide (CLAM's one slide per step); a pair per step takes a larger step."""
    assert step_lr(train_cfg(lr=1e-3), 2) == pytest.approx(1e-3 * math.sqrt(2))
    assert step_lr(train_cfg(lr=1e-3, lr_scaling="linear"), 2) == pytest.approx(2e-3)
    assert step_lr(train_cfg(lr=1e-3, lr_scaling="none"), 2) == pytest.approx(1e-3)
    assert all(step_lr(train_cfg(lr=1e-3, lr_scaling=s), 1) == 1e-3 for s in ("linear", "sqrt"))
    # lr_scaling "none" at lr·√2 is the same training as the default at lr (pairs every step)
    scaled = train(toy_model(), TRAIN, [], train_cfg(epochs=2, lr=1e-3))
    same = train(
        toy_model(), TRAIN, [], train_cfg(epochs=2, lr=1e-3 * math.sqrt(2), lr_scaling="none")
    )
    assert _no_time(scaled.history) == _no_time(same.history)


# --- the model's fast paths the trainer relies on (common/mil/models.py) -------------------


@pytest.mark.parametrize("p", [0.25, 0.1])  # 8 random bits per element, and 16
def test_mask_dropout_is_inverted_dropout_with_a_boolean_trace(p: float) -> None:
    layer = MaskDropout(p)
    x = torch.randn(400, 300, requires_grad=True)
    torch.manual_seed(5)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), y)  # torch.manual_seed drives the mask
    assert not torch.equal(layer(x), y)  # and the next draw differs
    keep = y != 0
    scale = 65536 / round(65536 * (1 - p))
    assert abs(float(keep.float().mean()) - (1 - p)) < 0.01
    torch.testing.assert_close(y[keep], x[keep] * scale, rtol=1e-6, atol=0)
    assert [t.dtype for t in saved] == [torch.bool]  # 1 byte per element kept for backward
    (y * 2).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, 2 * scale * keep.float())
    layer.eval()
    assert layer(x) is x
    assert MaskDropout(0.0)(x) is x


def test_keep_masks_do_not_depend_on_the_chunk_size() -> None:
    for threshold in (49152, 58982):  # p = 0.25 (8-bit draws) and p ≈ 0.1 (16-bit)
        whole = models._keep_mask(100_003, threshold, seed=7)
        pieces = models._keep_mask(100_003, threshold, seed=7, chunk=1000)
        assert np.array_equal(whole, pieces)


def test_combined_dropouts_equal_the_layers_in_turn() -> None:
    a, b = MaskDropout(0.25), MaskDropout(0.5)
    x = torch.randn(64, 32)
    torch.manual_seed(2)
    combined = models.combined_dropout(x, (a, b))
    torch.manual_seed(2)
    torch.testing.assert_close(combined, b(a(x)))
    bf16 = x.bfloat16()
    torch.manual_seed(2)
    assert models.combined_dropout(bf16, (a, b)).dtype == torch.bfloat16


def test_bfloat16_tanh_is_evaluated_in_float32() -> None:
    x = torch.randn(50, 20).bfloat16().requires_grad_()
    y = Tanh()(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, torch.tanh(x.detach().float()).bfloat16())
    y.float().sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad.float(), 1 - y.detach().float() ** 2, rtol=0.02, atol=0.01)
    plain = torch.randn(5, requires_grad=True)
    assert torch.equal(Tanh()(plain), torch.tanh(plain))


@pytest.mark.parametrize("branches", [1, 3])
def test_wide_pooling_matches_float32_pooling(
    branches: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bfloat16 h pooled in float32 without a float32 copy: same values and gradients as
    bmm(A, h.float()), whatever the chunking."""
    monkeypatch.setattr(models._WidePooling, "CHUNK", 7)
    h = torch.randn(2, 30, 16).bfloat16().requires_grad_()
    a = torch.softmax(torch.randn(2, branches, 30), dim=-1).requires_grad_()
    got = models._WidePooling.apply(a, h)
    (got * torch.arange(16.0)).sum().backward()
    assert got.dtype == torch.float32
    h2, a2 = h.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    want = torch.bmm(a2, h2.float())
    (want * torch.arange(16.0)).sum().backward()
    torch.testing.assert_close(got, want)
    assert a.grad is not None and a2.grad is not None and h.grad is not None
    torch.testing.assert_close(a.grad, a2.grad)
    assert h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h.grad, h2.grad)


def test_fast_bf16_cpu_reads_vendor_and_flags(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AMX anywhere, AVX512-BF16 only on AMD (measured slower than float32 on Intel)."""
    from fedpath.client.training import trainer

    monkeypatch.setattr(trainer, "amx_available", lambda: False)
    info = tmp_path / "cpuinfo"
    cases = {
        ("AuthenticAMD", "avx2 avx512f avx512_bf16"): True,
        ("GenuineIntel", "avx2 avx512f avx512_bf16"): False,
        ("AuthenticAMD", "avx2 avx512f"): False,
    }
    for (vendor, flags), want in cases.items():
        info.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n")
        assert trainer.fast_bf16_cpu(info) is want, (vendor, flags)
    assert trainer.fast_bf16_cpu(tmp_path / "missing") is False
    monkeypatch.setattr(trainer, "amx_available", lambda: True)
    assert trainer.fast_bf16_cpu(tmp_path / "missing") is True


# --------------------------------------------------------------------------------------------
# Which validation loss chooses the epoch
# --------------------------------------------------------------------------------------------


def test_evaluate_reports_the_pooled_patch_loss_of_labelled_patches() -> None:
    """Patch CE is pooled over the labelled patches of the bags that have patch labels
    (-1: ambiguous, left out), computed from the instance logits; NaN without any."""
    model = toy_model().eval()
    bags = list(VAL[:6])
    first = next(i for i, b in enumerate(bags) if b.patch_labels is not None)
    labels = bags[first].patch_labels
    assert labels is not None
    ambiguous = labels.clone()
    ambiguous[1] = -1
    bags[first] = Bag(bags[first].entry, bags[first].features, ambiguous)
    total, count = 0.0, 0
    with torch.no_grad():
        for bag in bags:
            if bag.patch_labels is None:
                continue
            out = model(bag.features[None], torch.ones(1, bag.num_patches, dtype=torch.bool))
            logits = out.instance_logits[0].double()
            known = bag.patch_labels >= 0
            target = bag.patch_labels[known].long()
            total += float(
                torch.nn.functional.cross_entropy(logits[known], target, reduction="sum")
            )
            count += int(known.sum())
    val = evaluate(model, bags)
    assert count > 0 and val.patch_loss == pytest.approx(total / count, rel=1e-9)
    unlabelled = [Bag(b.entry, b.features, None) for b in bags]
    assert math.isnan(evaluate(model, unlabelled).patch_loss)


def test_stopping_loss_weighs_patches_only_when_asked_in_mixed_mode() -> None:
    val = trainer.ValidationMetrics(loss=0.4, auc=1.0, patch_auc=0.8, patch_loss=0.9)
    mixed = SupervisionConfig(mode="mixed", bag_weight=0.7)
    weak = SupervisionConfig(mode="weak", bag_weight=0.7)
    assert trainer.stopping_loss(val, train_cfg(supervision=mixed)) == 0.4  # default: CLAM's
    supervised = train_cfg(supervision=mixed, stopping_loss="supervised")
    assert trainer.stopping_loss(val, supervised) == pytest.approx(0.7 * 0.4 + 0.3 * 0.9)
    assert (
        trainer.stopping_loss(val, train_cfg(supervision=weak, stopping_loss="supervised")) == 0.4
    )
    no_patches = replace(val, patch_loss=math.nan)
    assert trainer.stopping_loss(no_patches, supervised) == 0.4
    patch = train_cfg(supervision=mixed, stopping_loss="patch")
    assert trainer.stopping_loss(val, patch) == 0.9
    assert trainer.stopping_loss(no_patches, patch) == 0.4
    assert trainer.stopping_loss(val, train_cfg(supervision=weak, stopping_loss="patch")) == 0.4
    with pytest.raises(ValidationError):
        train_cfg(stopping_loss="attention")


@pytest.mark.slow
def test_supervised_stopping_keeps_the_epoch_the_patches_were_learnt() -> None:
    """Validation slide labels flipped, patch labels right: the slide loss is lowest early,
    so the default keeps an early epoch; the supervised loss (bag weight 0.2 here) goes by the
    patches and keeps a later one. The chosen epoch is the argmin of what each run reports
    as its stopping loss; a weak run ignores the patch labels and keeps the slide loss."""
    val = toy_bags(12, seed=2, flip=True)
    mixed = SupervisionConfig(mode="mixed", bag_weight=0.2)
    by_slide = train(toy_model(), TRAIN, val, train_cfg(epochs=12, supervision=mixed))
    supervised = train_cfg(epochs=12, supervision=mixed, stopping_loss="supervised")
    by_patch = train(toy_model(), TRAIN, val, supervised)
    for result in (by_slide, by_patch):
        best = min(result.history, key=lambda m: m.val_stopping_loss)
        assert result.best_epoch == best.epoch
    assert all(m.val_stopping_loss == m.val_loss for m in by_slide.history)
    for m in by_patch.history:
        assert m.val_stopping_loss == pytest.approx(0.2 * m.val_loss + 0.8 * m.val_patch_loss)
    assert by_patch.best_epoch > by_slide.best_epoch
    patch_only = train(
        toy_model(), TRAIN, val, train_cfg(epochs=12, supervision=mixed, stopping_loss="patch")
    )
    best = min(patch_only.history, key=lambda m: m.val_patch_loss)
    assert patch_only.best_epoch == best.epoch > by_slide.best_epoch
    assert all(m.val_stopping_loss == m.val_patch_loss for m in patch_only.history)
    assert evaluate(by_patch.model, val).patch_loss < evaluate(by_slide.model, val).patch_loss
    weak = SupervisionConfig(mode="weak", bag_weight=0.2)
    weak_run = train(
        toy_model(), TRAIN, val, train_cfg(epochs=3, supervision=weak, stopping_loss="supervised")
    )
    assert all(m.val_stopping_loss == m.val_loss for m in weak_run.history)


def test_training_steps_see_at_most_max_train_patches_of_a_slide() -> None:
    model = toy_model()
    seen = forward_lengths(model)
    train(model, TRAIN, VAL, train_cfg(epochs=2, precision="float32", max_train_patches=16))
    trained = [n for training, n in seen if training]
    validated = [n for training, n in seen if not training]
    assert trained and max(trained) == 16  # TRAIN bags have 20-60 patches
    assert max(validated) > 16  # validation scores every patch


def test_max_train_patches_zero_means_every_patch_and_negatives_are_refused() -> None:
    assert TrainConfig(max_train_patches=0).max_train_patches is None
    assert TrainConfig.model_validate({"max_train_patches": 0}).max_train_patches is None
    assert TrainConfig(max_train_patches=None).max_train_patches is None
    with pytest.raises(ValidationError):
        TrainConfig(max_train_patches=-5)


@pytest.mark.slow
def test_a_cap_above_every_slide_trains_exactly_as_every_patch() -> None:
    """Sampling has its own random stream: runs on small slides are what they were."""
    runs = {
        cap: train(toy_model(), TRAIN, VAL, train_cfg(epochs=2, max_train_patches=cap))
        for cap in (None, 60, 16)
    }
    every, above, below = (runs[c].model.state_dict() for c in (None, 60, 16))
    for key, value in every.items():
        assert torch.equal(value, above[key]), key
    assert any(not torch.equal(v, below[k]) for k, v in every.items())
