"""Slide-level DP-SGD: per-slide gradients, clipping, noise, refusal of unsafe models, the plan;
in float32 and under bfloat16 autocast (the guarantee must not depend on the forward's
precision)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from fedpath.client.training import trainer
from fedpath.client.training.bags import Bag, bucket_length, collate
from fedpath.client.training.privacy_accountant import epsilon, sampling_plan
from fedpath.client.training.private_trainer import (
    PrivateTrainResult,
    check_private_model,
    clipped_slide_gradient,
    plan_private_training,
    slide_gradient,
    train_private,
)
from fedpath.common.dp_config import DPConfig
from fedpath.common.errors import ConfigError
from fedpath.common.mil.losses import mixed_supervision_loss
from tests.trainer_data import forward_lengths, toy_bags, toy_model, train_cfg

TRAIN = toy_bags(24, seed=1)
VAL = toy_bags(12, seed=2)
DP = DPConfig(enabled=True, noise_multiplier=1.0, expected_batch_slides=4)


def _unlabelled(bags: list[Bag]) -> list[Bag]:
    """Bags without patch labels: their instance targets (top-k attention) are deterministic."""
    return [
        Bag(replace(b.entry, has_patch_labels=False, annotation_complete=None), b.features, None)
        for b in bags
    ]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("kind", ["clam_sb", "clam_mb"])
def test_a_slide_alone_gives_opacus_per_sample_gradient(kind: str) -> None:
    """The hand loop's per-slide gradient equals Opacus' per-sample gradient of that slide
    computed inside a padded batch (GradSampleModule), so no hooks are needed."""
    from opacus.grad_sample import GradSampleModule

    bags = _unlabelled(TRAIN[:4])
    cfg = train_cfg()
    model = toy_model(kind, dropout=0.0).train()
    reference = toy_model(kind, dropout=0.0).train()
    reference.load_state_dict(model.state_dict())
    gsm = GradSampleModule(reference, loss_reduction="mean")
    batch = collate(bags)
    out = gsm(batch.features, batch.mask)
    parts = mixed_supervision_loss(
        out.logits,
        out.attention,
        out.instance_logits,
        batch.labels,
        batch.patch_labels,
        batch.annotation_complete,
        batch.mask,
        cfg.supervision,
        torch.Generator().manual_seed(0),
    )
    parts.total.backward()
    per_sample = [p.grad_sample for p in reference.parameters()]
    for i, bag in enumerate(bags):
        grads, _, norm = clipped_slide_gradient(
            model, bag, cfg, torch.Generator().manual_seed(0), max_grad_norm=1e9
        )
        for mine, theirs in zip(grads, per_sample, strict=True):
            assert torch.allclose(mine, theirs[i], atol=1e-5)
        expected = torch.sqrt(sum((g[i].double() ** 2).sum() for g in per_sample))
        assert norm == pytest.approx(float(expected), rel=1e-4)
    gsm.remove_hooks()


def test_float32_slide_gradient_is_the_plain_autograd_gradient() -> None:
    """precision float32 (the default) is a plain forward on the unpadded bag, no autocast:
    bit for bit the gradient the float32-only trainer computed (and the Opacus test above
    checks against GradSampleModule)."""
    cfg = train_cfg()
    model = toy_model("clam_sb", dropout=0.0).train()
    params = [p for p in model.parameters() if p.requires_grad]
    for bag in TRAIN[:6]:
        batch = collate([bag])
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
            torch.Generator().manual_seed(3),
        )
        plain = torch.autograd.grad(parts.total, params, allow_unused=True)
        for precision in ({}, {"precision": "float32"}):
            grads, losses = slide_gradient(
                model, bag, cfg, torch.Generator().manual_seed(3), **precision
            )
            assert losses[0] == float(parts.total.detach())
            for mine, theirs in zip(grads, plain, strict=True):
                assert theirs is not None and torch.equal(mine, theirs)


@pytest.mark.parametrize("kind", ["abmil", "clam_sb", "clam_mb"])
def test_bfloat16_slide_gradients_are_float32_and_clipped_to_c(kind: str) -> None:
    """Under bfloat16 autocast every per-slide gradient comes out float32 (what Opacus clips
    and sums), points where the float32 one points, and clipping bounds it by C."""
    cfg = train_cfg()
    model = toy_model(kind, dropout=0.0).train()
    clip = 0.05
    norms = []
    for bag in TRAIN[:8]:
        fp32, _, _ = clipped_slide_gradient(
            model, bag, cfg, torch.Generator().manual_seed(1), 1e9, "float32"
        )
        bf16, _, norm = clipped_slide_gradient(
            model, bag, cfg, torch.Generator().manual_seed(1), 1e9, "bfloat16"
        )
        assert all(g.dtype == torch.float32 for g in bf16)
        a, b = torch.cat([g.flatten() for g in fp32]), torch.cat([g.flatten() for g in bf16])
        assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99
        assert float(b.norm()) == pytest.approx(float(a.norm()), rel=0.05)
        clipped, _, norm_again = clipped_slide_gradient(
            model, bag, cfg, torch.Generator().manual_seed(1), clip, "bfloat16"
        )
        assert norm_again == norm  # bfloat16 on the same slide is deterministic
        total = float(torch.sqrt(sum((g.double() ** 2).sum() for g in clipped)))
        assert total <= clip * (1 + 1e-6)
        norms.append(norm)
    assert max(norms) > clip, "the bound must have been active for this test to mean anything"


def test_bfloat16_bucket_padding_adds_nothing_to_a_slides_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In bfloat16 a slide is padded to its length bucket (as the plain trainer pads); the
    masked rows get no attention and no loss, so the gradient is the unpadded one's."""
    from fedpath.client.training import private_trainer as pt

    cfg = train_cfg()
    model = toy_model("clam_mb", dropout=0.0).train()  # dropout would draw masks for pad rows
    bags = [b for b in TRAIN if bucket_length(b.num_patches) > b.num_patches][:4]
    assert len(bags) == 4
    padded = [
        pt.slide_gradient(model, b, cfg, torch.Generator().manual_seed(0), "bfloat16") for b in bags
    ]
    monkeypatch.setattr(pt, "collate_for", lambda bags, *_: collate(bags, dtype=torch.bfloat16))
    for bag, (grads, losses) in zip(bags, padded, strict=True):
        plain, plain_losses = pt.slide_gradient(
            model, bag, cfg, torch.Generator().manual_seed(0), "bfloat16"
        )
        assert losses == pytest.approx(plain_losses, abs=1e-6)
        for a, b in zip(grads, plain, strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["abmil", "clam_sb", "clam_mb"])
def test_every_slide_contribution_is_clipped_to_c(kind: str) -> None:
    model = toy_model(kind).train()
    cfg = train_cfg()
    clip = 0.05
    norms = []
    for bag in TRAIN:
        grads, _, norm = clipped_slide_gradient(
            model, bag, cfg, torch.Generator().manual_seed(1), clip
        )
        clipped = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        assert clipped <= clip * (1 + 1e-6)
        norms.append(norm)
    assert max(norms) > clip, "the bound must have been active for this test to mean anything"


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_noisy_step_sums_clipped_slides_and_adds_noise_of_std_sigma_c(
    monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """With σ = 0 one step's gradient is Σ clipped / B exactly; with σ > 0 the difference from
    that sum has std σ·C/B (checked over ~10^4 coordinates). Under bfloat16 the sum is that
    of the bfloat16 per-slide gradients clipped in float32, and the noise is the same."""
    from fedpath.client.training import private_trainer as pt

    captured: list[list[torch.Tensor]] = []
    original_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        captured.append([p.grad.detach().clone() for p in self.param_groups[0]["params"]])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    bags = TRAIN[:8]
    cfg = train_cfg(epochs=1, lr=0.0, precision=precision)  # lr 0: every step sees the same weights
    clip = 0.1
    sums = {}
    for sigma in (1e-12, 2.0):
        dp = DPConfig(
            enabled=True, noise_multiplier=sigma, expected_batch_slides=4, max_grad_norm=clip
        )
        captured.clear()
        model = toy_model("clam_sb", dropout=0.0)
        pt.train_private(model, bags, [], cfg, dp, secret_seed=5)
        sums[sigma] = captured[0]
    # Rebuild step 1's clipped sum by hand: same secret seed → same Poisson draw (Opacus'
    # sampler, which the trainer uses), clipping by the rule Opacus' DPOptimizer applies.
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    _, _, poisson_seed, _ = pt.epoch_streams(cfg.seed, 5, 0)
    sampler = UniformWithReplacementSampler(
        num_samples=len(bags),
        sample_rate=0.5,
        generator=torch.Generator().manual_seed(poisson_seed % (2**63)),
        steps=2,
    )
    chosen = next(iter(sampler))
    assert len(chosen) > 0
    model = toy_model("clam_sb", dropout=0.0).train()
    instances = torch.Generator().manual_seed(pt.epoch_streams(cfg.seed, 5, 0)[1])
    total = None
    for i in chosen:
        grads, _, _ = clipped_slide_gradient(model, bags[int(i)], cfg, instances, clip, precision)
        total = grads if total is None else [a + g for a, g in zip(total, grads, strict=True)]
    assert total is not None
    expected = [t / 4.0 for t in total]
    for got, want in zip(sums[1e-12], expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    noise = torch.cat([(g - w).flatten() for g, w in zip(sums[2.0], expected, strict=True)])
    assert noise.numel() > 5000
    assert float(noise.std()) == pytest.approx(2.0 * clip / 4.0, rel=0.05)


def test_bfloat16_update_is_float32_clipped_slides_plus_sigma_c_noise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What Opacus' DPOptimizer receives and sums in a real bfloat16 run, step by step: float32
    per-slide gradients; every contribution to the sum has norm ≤ C (and the bound is hit);
    the sum is exactly those contributions; the noise added to it has mean 0 and std σ·C."""
    from opacus.optimizers import DPOptimizer

    steps: list[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = []
    clip_and_accumulate, add_noise = DPOptimizer.clip_and_accumulate, DPOptimizer.add_noise

    def spy_clip(self: DPOptimizer) -> None:
        steps.append(([p.grad_sample.detach().clone() for p in self.params], [], []))
        clip_and_accumulate(self)
        steps[-1][1].extend(p.summed_grad.detach().clone() for p in self.params)

    def spy_noise(self: DPOptimizer) -> None:
        add_noise(self)
        steps[-1][2].extend(p.grad.detach().clone() for p in self.params)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy_clip)
    monkeypatch.setattr(DPOptimizer, "add_noise", spy_noise)
    clip, sigma = 0.05, 1.5
    dp = DPConfig(enabled=True, noise_multiplier=sigma, expected_batch_slides=4, max_grad_norm=clip)
    result = train_private(
        toy_model("clam_mb"),
        TRAIN,
        [],
        train_cfg(epochs=2, precision="bfloat16"),
        dp,
        secret_seed=8,
    )
    assert result.result.precision == "bfloat16"
    assert len(steps) == result.mechanism.steps == 12
    norms, noise = [], []
    for samples, summed, noisy in steps:
        assert all(g.dtype == torch.float32 for g in samples + summed + noisy)
        n = len(samples[0])
        expected = [torch.zeros_like(s, dtype=torch.float64) for s in summed]
        for i in range(n):
            norm = float(torch.sqrt(sum((g[i].double() ** 2).sum() for g in samples)))
            factor = min(1.0, clip / (norm + 1e-6))
            contribution = [g[i].double() * factor for g in samples]
            assert float(torch.sqrt(sum((c**2).sum() for c in contribution))) <= clip * (1 + 1e-5)
            expected = [e + c for e, c in zip(expected, contribution, strict=True)]
            norms.append(norm)
        for got, want in zip(summed, expected, strict=True):
            assert torch.allclose(got.double(), want, atol=1e-7)
        noise.append(torch.cat([(g - s).flatten() for g, s in zip(noisy, summed, strict=True)]))
    assert max(norms) > clip, "the bound must have been active for this test to mean anything"
    pooled = torch.cat(noise).double()
    assert pooled.numel() > 10_000
    assert float(pooled.std()) == pytest.approx(sigma * clip, rel=0.03)
    assert abs(float(pooled.mean())) < 4 * sigma * clip / pooled.numel() ** 0.5


def _history(result: PrivateTrainResult) -> list[tuple[float, float, int]]:
    return [(h.train_loss, h.val_loss, h.n_steps) for h in result.result.history]


@pytest.mark.slow
def test_bfloat16_dp_training_tracks_float32() -> None:
    """Same secret seed, so the same Poisson draws and the same noise: a bfloat16 DP-SGD run
    follows the float32 one epoch by epoch, and both learn the easy task."""
    dp = DPConfig(enabled=True, noise_multiplier=0.5, expected_batch_slides=4, delta=1e-3)
    cfg = train_cfg(epochs=6, lr=5e-3)
    runs = {
        precision: train_private(
            toy_model("clam_sb"),
            TRAIN,
            VAL,
            cfg.model_copy(update={"precision": precision}),
            dp,
            secret_seed=4,
        )
        for precision in ("float32", "bfloat16")
    }
    fp32, bf16 = runs["float32"], runs["bfloat16"]
    assert (fp32.result.precision, bf16.result.precision) == ("float32", "bfloat16")
    assert fp32.mechanism == bf16.mechanism
    for (train_a, val_a, steps_a), (train_b, val_b, steps_b) in zip(
        _history(fp32), _history(bf16), strict=True
    ):
        assert steps_a == steps_b
        assert train_b == pytest.approx(train_a, abs=0.02)
        assert val_b == pytest.approx(val_a, abs=0.01)
    for run in (fp32, bf16):
        history = run.result.history
        assert history[-1].val_loss < history[0].val_loss - 0.1
        assert history[-1].val_auc >= 0.9


def test_auto_precision_is_the_plain_trainers_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Precision "auto" resolves as in the plain trainer: float32 where bfloat16 is not fast,
    and then exactly the float32 run; bfloat16 where it is, and then exactly that run."""
    cfg = train_cfg(epochs=1)
    bags = TRAIN[:12]

    def run(**update: str) -> PrivateTrainResult:
        config = cfg.model_copy(update=update)
        return train_private(toy_model("clam_sb"), bags, VAL[:4], config, DP, secret_seed=2)

    for fast, expected in ((False, "float32"), (True, "bfloat16")):
        monkeypatch.setattr(trainer, "fast_bf16_cpu", lambda fast=fast: fast)
        auto, pinned = run(), run(precision=expected)
        assert auto.result.precision == pinned.result.precision == expected
        for key, value in auto.result.model.state_dict().items():
            assert torch.equal(value, pinned.result.model.state_dict()[key]), key
        assert _history(auto) == _history(pinned)


@pytest.mark.slow
def test_private_training_is_reproducible_and_plans_its_steps() -> None:
    cfg = train_cfg(epochs=2)
    bags, val = TRAIN[:12], VAL[:4]
    a = train_private(toy_model("clam_sb"), bags, val, cfg, DP, secret_seed=11)
    b = train_private(toy_model("clam_sb"), bags, val, cfg, DP, secret_seed=11)
    c = train_private(toy_model("clam_sb"), bags, [], cfg, DP, secret_seed=12)
    q, per_epoch = sampling_plan(len(bags), 4)
    assert a.mechanism.sample_rate == q == pytest.approx(4 / 12)
    assert a.mechanism.steps == 2 * per_epoch == 6
    assert a.mechanism.noise_multiplier == 1.0
    assert all(h.n_steps == per_epoch for h in a.result.history)
    for key, value in a.result.model.state_dict().items():
        assert torch.equal(value, b.result.model.state_dict()[key]), key
    assert any(
        not torch.equal(v, c.result.model.state_dict()[k])
        for k, v in a.result.model.state_dict().items()
    ), "another secret seed draws other noise"
    assert all(torch.isfinite(torch.tensor(h.train_loss)) for h in a.result.history)
    assert all(0.0 <= h.val_auc <= 1.0 for h in a.result.history)


def test_without_a_secret_seed_two_runs_differ() -> None:
    cfg = train_cfg(epochs=1)
    a = train_private(toy_model("abmil"), TRAIN, [], cfg, DP).result.model.state_dict()
    b = train_private(toy_model("abmil"), TRAIN, [], cfg, DP).result.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_target_epsilon_solves_sigma_for_the_planned_rounds() -> None:
    dp = DPConfig(
        enabled=True, target_epsilon=4.0, expected_batch_slides=4, planned_rounds=5, delta=1e-3
    )
    one_round = plan_private_training(dp, n_slides=24, epochs=2)
    spent = epsilon([one_round] * 5, delta=1e-3)
    assert 3.9 < spent <= 4.0
    assert epsilon([one_round] * 6, delta=1e-3) > 4.0


def test_models_dp_sgd_cannot_protect_are_refused() -> None:
    model = toy_model("clam_sb")
    model.extra_norm = nn.BatchNorm1d(4)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="cannot be trained with DP-SGD") as info:
        check_private_model(model)
    assert "BatchNorm" in str(info.value)
    assert "buffers" in str(info.value) and "running_mean" in str(info.value)
    with pytest.raises(ConfigError, match="BatchNorm"):
        train_private(model, TRAIN, [], train_cfg(epochs=1), DP, secret_seed=0)
    check_private_model(toy_model("clam_mb"))  # the fedpath models pass


def test_dp_config_and_plan_validation() -> None:
    with pytest.raises(ValidationError, match="noise multiplier"):
        DPConfig(enabled=True)
    with pytest.raises(ValidationError, match="not both"):
        DPConfig(enabled=True, noise_multiplier=1.0, target_epsilon=3.0)
    for bad in ({"noise_multiplier": 0.0}, {"max_grad_norm": 0}, {"delta": 1.0}, {"delta": 0}):
        with pytest.raises(ValidationError):
            DPConfig(enabled=True, **{"noise_multiplier": 1.0, **bad})
    with pytest.raises(ValidationError):
        DPConfig(enabled=True, noise_multiplier=1.0, expected_batch=4)  # extra="forbid"
    assert DPConfig().enabled is False  # off by default, nothing else needed
    with pytest.raises(ConfigError, match="not below 1/N"):
        plan_private_training(_with_delta(0.05), n_slides=24, epochs=1)


def _with_delta(delta: float) -> DPConfig:
    return DPConfig(enabled=True, noise_multiplier=1.0, delta=delta)


def test_private_steps_train_on_the_sampled_patches_only() -> None:
    model = toy_model("clam_sb")
    seen = forward_lengths(model)
    cfg = train_cfg(epochs=1, precision="float32", max_train_patches=16)
    train_private(model, TRAIN[:12], VAL[:4], cfg, DP, secret_seed=11)
    trained = [n for training, n in seen if training]
    assert trained and max(trained) == 16  # one slide per pass, 16 of its 20-60 patches
    assert max(n for training, n in seen if not training) > 16
    every = train_private(
        toy_model("clam_sb"), TRAIN[:12], [], train_cfg(epochs=1), DP, secret_seed=11
    )
    capped = train_private(
        toy_model("clam_sb"),
        TRAIN[:12],
        [],
        train_cfg(epochs=1, max_train_patches=60),
        DP,
        secret_seed=11,
    )
    for key, value in every.result.model.state_dict().items():
        assert torch.equal(value, capped.result.model.state_dict()[key]), key
