"""Attention-MIL models (DESIGN §4.3): shapes, masking, padding invariance, gradients, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fedpath.common.mil.config import ModelConfig
from fedpath.common.mil.models import (
    ABMIL,
    CLAMMB,
    CLAMSB,
    MILModel,
    MILOutput,
    build_model,
    count_parameters,
)

KINDS = ["abmil", "clam_sb", "clam_mb"]
D, H, C = 12, 16, 3


def _model(kind: str, seed: int = 0, **overrides: object) -> MILModel:
    settings: dict[str, object] = {
        "kind": kind,
        "feature_dim": D,
        "hidden_dim": H,
        "n_classes": C,
        **overrides,
    }
    torch.manual_seed(seed)
    return build_model(ModelConfig(**settings))


def _batch(lengths: list[int], d: int = D, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Padded batch of bags with the given lengths (padding filled with junk, not zeros)."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    features = torch.randn(len(lengths), n, d, generator=g) * 3.0 + 5.0
    mask = torch.arange(n).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return features, mask


def _outputs(out: MILOutput) -> dict[str, Tensor]:
    return {
        "logits": out.logits,
        "attention": out.attention,
        "attention_scores": out.attention_scores,
        "instance_logits": out.instance_logits,
        "embeddings": out.embeddings,
    }


def _reference(model: MILModel, bag: Tensor) -> dict[str, Tensor]:
    """The §4.3 formulas written out for one unpadded bag ``[n, D]`` (eval mode)."""
    w1, b1 = model.backbone[0].weight, model.backbone[0].bias
    v, bv = model.attention_a[0].weight, model.attention_a[0].bias
    u, bu = model.attention_b[0].weight, model.attention_b[0].bias
    w = model.attention_w.weight  # [K, att]
    h = torch.relu(bag @ w1.T + b1)  # [n, hidden]
    s = (torch.tanh(h @ v.T + bv) * torch.sigmoid(h @ u.T + bu)) @ w.T  # [n, K]
    a = torch.exp(s - s.max(dim=0).values) / torch.exp(s - s.max(dim=0).values).sum(dim=0)
    m = a.T @ h  # [K, hidden]
    if isinstance(model, CLAMMB):
        logits = torch.stack([head(m[c]).squeeze(-1) for c, head in enumerate(model.classifiers)])
    else:
        logits = model.classifier(m[0])
    return {"logits": logits, "attention": a.T, "embeddings": m, "h": h}


# --- shapes and construction ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("size", "att"), [("small", 256), ("big", 384)])
def test_shapes_per_variant_and_size(kind: str, size: str, att: int) -> None:
    model = _model(kind, size=size).eval()
    features, mask = _batch([5, 9, 3])
    out = model(features, mask)
    k = C if kind == "clam_mb" else 1
    assert out.logits.shape == (3, C)
    assert out.attention.shape == (3, k, 9)
    assert out.attention_scores.shape == (3, k, 9)
    assert out.instance_logits.shape == (3, 9, 2)
    assert out.embeddings.shape == (3, k, H)
    assert model.attention_a[0].weight.shape == (att, H)
    assert model.attention_w.weight.shape == (k, att)
    assert model.kind == kind


def test_build_model_picks_the_class_and_outputs_are_frozen() -> None:
    assert type(_model("abmil")) is ABMIL
    assert type(_model("clam_sb")) is CLAMSB
    assert type(_model("clam_mb")) is CLAMMB
    assert not ABMIL.has_instance_task and CLAMSB.has_instance_task and CLAMMB.has_instance_task
    out = _model("clam_sb").eval()(torch.zeros(1, 2, D))
    with pytest.raises(AttributeError):
        out.logits = torch.zeros(1)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kind", "gated", "expected"),
    [
        # W1: 12·16+16 = 208; V, U: 16·256+256 = 4352 each; w: 256·K (no bias)
        ("abmil", True, 208 + 2 * 4352 + 256 + (16 * 3 + 3)),  # 9223
        ("clam_sb", True, 208 + 2 * 4352 + 256 + (16 * 3 + 3) + (16 * 2 + 2)),  # 9257
        ("clam_mb", True, 208 + 2 * 4352 + 3 * 256 + 3 * (16 + 1) + (16 * 2 + 2)),  # 9765
        ("clam_sb", False, 208 + 4352 + 256 + (16 * 3 + 3) + (16 * 2 + 2)),  # 4905
    ],
)
def test_count_parameters_hand_computed(kind: str, gated: bool, expected: int) -> None:
    model = _model(kind, gated=gated)
    assert count_parameters(model) == expected
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    model.backbone[0].weight.requires_grad_(False)
    assert count_parameters(model) == expected - 12 * 16
    assert count_parameters(model, trainable_only=False) == expected


@pytest.mark.parametrize("kind", KINDS)
def test_init_is_deterministic_given_the_seed(kind: str) -> None:
    a, b, c = _model(kind, seed=7), _model(kind, seed=7), _model(kind, seed=8)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if name.endswith("weight"):
            assert not torch.equal(pa, pc), name
        else:  # CLAM initialisation: zero biases
            assert torch.count_nonzero(pa) == 0, name


# --- the formulas -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_the_written_out_formulas(kind: str) -> None:
    model = _model(kind).eval()
    with torch.no_grad():  # non-zero biases so that they are exercised too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.linspace(-0.5, 0.5, p.numel()))
    features, mask = _batch([4, 7])
    out = model(features, mask)
    for i, n in enumerate([4, 7]):
        ref = _reference(model, features[i, :n])
        assert torch.allclose(out.logits[i], ref["logits"], atol=1e-5)
        assert torch.allclose(out.attention[i, :, :n], ref["attention"], atol=1e-6)
        assert torch.allclose(out.embeddings[i], ref["embeddings"], atol=1e-5)
        if kind == "abmil":  # documented readout: slide classifier per patch, tumour vs rest
            z = model.classifier(ref["h"])
            expected = torch.stack([torch.logsumexp(z[:, [0, 2]], dim=1), z[:, 1]], dim=1)
        else:
            expected = model.instance_classifier(ref["h"])
        assert torch.allclose(out.instance_logits[i, :n], expected, atol=1e-5)


def test_identical_patches_get_uniform_attention_and_m_equals_h() -> None:
    model = _model("clam_mb").eval()
    patch = torch.randn(D)
    features = patch.expand(1, 4, D).clone()
    out = model(features)
    assert torch.allclose(out.attention, torch.full((1, C, 4), 0.25), atol=1e-7)
    h = torch.relu(model.backbone[0](patch))
    assert torch.allclose(out.embeddings, h.expand(1, C, H), atol=1e-6)


def test_abmil_two_class_instance_logits_are_the_slide_classifier_per_patch() -> None:
    model = _model("abmil", n_classes=2).eval()
    features, mask = _batch([6])
    out = model(features, mask)
    h = torch.relu(model.backbone[0](features[0]))
    assert torch.allclose(out.instance_logits[0], model.classifier(h), atol=1e-6)


def test_non_gated_attention_is_w_tanh_v_h() -> None:
    model = _model("clam_sb", gated=False).eval()
    assert model.attention_b is None
    features, _ = _batch([5])
    out = model(features)
    h = torch.relu(model.backbone[0](features[0]))
    s = model.attention_w(torch.tanh(model.attention_a[0](h))).T
    assert torch.allclose(out.attention_scores[0], s, atol=1e-6)
    assert torch.allclose(out.attention[0], torch.softmax(s, dim=-1), atol=1e-6)


# --- masking and padding ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_attention_is_a_distribution_over_real_patches_only(kind: str) -> None:
    model = _model(kind).eval()
    lengths = [3, 8, 1, 5]
    features, mask = _batch(lengths)
    out = model(features, mask)
    pad = ~mask
    sums = out.attention.sum(dim=-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-6)
    assert torch.all(out.attention.masked_select(pad.unsqueeze(1)) == 0)
    assert torch.all(out.attention_scores.masked_select(pad.unsqueeze(1)) == float("-inf"))
    assert torch.isfinite(out.attention_scores.masked_select(mask.unsqueeze(1))).all()
    assert torch.all(out.instance_logits.masked_select(pad.unsqueeze(-1)) == 0)
    # the one-patch bag puts all its attention on that patch
    assert torch.all(out.attention[2, :, 0] == 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_padded_features_do_not_change_any_output(kind: str) -> None:
    model = _model(kind).eval()
    features, mask = _batch([4, 7, 2])
    before = _outputs(model(features, mask))
    junk = features.clone()
    junk[~mask] = torch.tensor(float("nan"))
    junk[0, 5] = 1e6
    junk[0, 6] = float("inf")
    after = _outputs(model(junk, mask))
    for name, value in before.items():
        assert torch.equal(value, after[name]), name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gated", [True, False])
def test_single_unpadded_bag_equals_the_same_bag_in_a_padded_batch(kind: str, gated: bool) -> None:
    model = _model(kind, gated=gated).eval()
    lengths = [9, 4, 13, 6]
    features, mask = _batch(lengths)
    batched = _outputs(model(features, mask))
    for i, n in enumerate(lengths):
        alone = _outputs(model(features[i : i + 1, :n]))  # B = 1, mask=None
        for name, value in alone.items():
            got = batched[name][i : i + 1]
            if name in ("attention", "attention_scores"):
                got = got[..., :n]
            elif name == "instance_logits":
                got = got[:, :n]
            assert torch.allclose(got, value, atol=1e-6), (kind, i, name)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_is_exact_up_to_rounding_in_float64(kind: str) -> None:
    """In float32 the bag alone and in a batch differ by a few ulps (matmul blocking depends on
    N); in float64 the gap shrinks to ~1e-15, so it is rounding and not leakage from padding."""
    model = _model(kind).double().eval()
    lengths = [9, 4, 13]
    features, mask = _batch(lengths)
    features = features.double()
    batched = model(features, mask)
    for i, n in enumerate(lengths):
        alone = model(features[i : i + 1, :n])
        assert torch.allclose(batched.logits[i], alone.logits[0], atol=1e-12, rtol=0)
        assert torch.allclose(batched.embeddings[i], alone.embeddings[0], atol=1e-12, rtol=0)
        assert torch.allclose(batched.attention[i, :, :n], alone.attention[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_bag_without_real_patches_raises(kind: str) -> None:
    model = _model(kind).eval()
    features, mask = _batch([3, 4])
    mask[1] = False
    with pytest.raises(ValueError, match=r"bags \[1\] have no real patch"):
        model(features, mask)
    with pytest.raises(ValueError, match="no real patch"):
        model(torch.zeros(1, 0, D))  # an empty bag without a mask


def test_bad_inputs_raise() -> None:
    model = _model("clam_sb")
    features, mask = _batch([3, 4])
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        model(features[0])
    with pytest.raises(ValueError, match="expects 12"):
        model(torch.zeros(2, 4, D + 1))
    with pytest.raises(ValueError, match="boolean"):
        model(features, mask.float())
    with pytest.raises(ValueError, match=r"mask must be \[B, N\]"):
        model(features, mask[:, :3])
    with pytest.raises(ValueError, match="floating point"):
        model(features.long(), mask)


def test_empty_batch_gives_empty_outputs() -> None:
    """Poisson sampling under DP-SGD can draw an empty logical batch."""
    out = _model("clam_mb").eval()(torch.zeros(0, 0, D), torch.zeros(0, 0, dtype=torch.bool))
    assert out.logits.shape == (0, C)
    assert out.attention.shape == (0, C, 0)


# --- dropout and gradients --------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_eval_is_deterministic_and_train_uses_dropout(kind: str) -> None:
    model = _model(kind, dropout=0.5)
    features, mask = _batch([6, 8])
    model.eval()
    first, second = _outputs(model(features, mask)), _outputs(model(features, mask))
    for name, value in first.items():
        assert torch.equal(value, second[name]), name
    model.train()
    torch.manual_seed(3)
    a = model(features, mask).logits
    torch.manual_seed(4)
    b = model(features, mask).logits
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gated", [True, False])
def test_every_parameter_gets_a_gradient(kind: str, gated: bool) -> None:
    model = _model(kind, gated=gated).train()
    features, mask = _batch([5, 9, 2])
    out = model(features, mask)
    (out.logits.sum() + out.instance_logits.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) > 0, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("kind", KINDS)
def test_opacus_per_sample_gradients_match_one_bag_at_a_time(kind: str) -> None:
    """Rows never mix: Opacus' per-sample gradient of slide i equals its gradient alone."""
    grad_sample = pytest.importorskip("opacus.grad_sample")
    model = _model(kind, dropout=0.0).train()  # Opacus records activations in train mode only
    lengths = [5, 2, 7]
    features, mask = _batch(lengths)
    gsm = grad_sample.GradSampleModule(model, loss_reduction="sum")
    out = gsm(features, mask)
    (out.logits.sum() + out.instance_logits.sum()).backward()
    per_sample = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
    for i, n in enumerate(lengths):
        single = _model(kind, dropout=0.0)
        single.load_state_dict(model.state_dict())
        alone = single(features[i : i + 1, :n])
        (alone.logits.sum() + alone.instance_logits.sum()).backward()
        for name, p in single.named_parameters():
            assert torch.allclose(per_sample[name][i], p.grad, atol=1e-5), (name, i)
    gsm.remove_hooks()


# --- learning ---------------------------------------------------------------------------


def _synthetic_bags(n_bags: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Noise bags of 8-15 patches; positives hold 2-3 patches shifted by +2 on every dim."""
    g = torch.Generator().manual_seed(seed)
    d = 8
    lengths = torch.randint(8, 16, (n_bags,), generator=g)
    n = int(lengths.max())
    features = torch.randn(n_bags, n, d, generator=g)
    mask = torch.arange(n).unsqueeze(0) < lengths.unsqueeze(1)
    labels = (torch.arange(n_bags) % 2).long()
    shifted = torch.zeros(n_bags, n, dtype=torch.bool)
    for i in range(n_bags):
        if labels[i] == 1:
            k = 2 + int(torch.randint(0, 2, (1,), generator=g))
            where = torch.randperm(int(lengths[i]), generator=g)[:k]
            shifted[i, where] = True
    features = features + 2.0 * shifted.unsqueeze(-1)
    return features, mask, labels, shifted


def _train(
    kind: str, seed: int, features: Tensor, mask: Tensor, labels: Tensor
) -> tuple[list[float], Tensor]:
    """30 full-batch Adam steps on the slide loss; losses before each step, then the final one."""
    torch.manual_seed(seed)
    model = build_model(
        ModelConfig(kind=kind, feature_dim=8, hidden_dim=16, n_classes=2, dropout=0.0)
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(features, mask).logits, labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        out = model(features, mask)
    losses.append(F.cross_entropy(out.logits, labels).item())
    return losses, out.attention


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_learns_a_synthetic_task_and_attends_to_the_shifted_patches(kind: str) -> None:
    """Five initialisations: the loss always falls, attention finds the evidence in most.

    A few initialisations settle in a different optimum (attention on unshifted patches), so
    concentration is required of 4 of 5 seeds rather than of one lucky seed. With ``clam_mb``
    and the slide loss alone nothing ties the evidence to a particular branch (branch 1 can
    find the positives or branch 0 can veto them), so the better branch is taken.
    """
    features, mask, labels, shifted = _synthetic_bags(40, seed=5)
    positives = labels == 1
    uniform = float((shifted.sum(dim=1) / mask.sum(dim=1))[positives].mean())  # about 0.2
    concentrated = 0
    for seed in range(5):
        losses, attention = _train(kind, seed, features, mask, labels)
        assert losses[0] > 0.3  # an untrained start (log 2 = 0.69 at chance)
        assert losses[-1] < 0.6 * losses[0]
        mass = (attention * shifted.unsqueeze(1)).sum(dim=-1)[positives].mean(dim=0)  # [K]
        best = float(mass.max())
        assert float((attention * shifted.unsqueeze(1)).sum(dim=-1)[~positives].max()) == 0.0
        concentrated += best > 0.6 and best > 2.5 * uniform
    assert concentrated >= 4
