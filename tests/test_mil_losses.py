"""Mixed-supervision losses against hand-computed values (DESIGN §4.4)."""

from __future__ import annotations

import math

import pytest
import torch

from fedpath.common.mil.config import SupervisionConfig
from fedpath.common.mil.losses import (
    attention_loss,
    instance_targets,
    mixed_supervision_loss,
    normalised_entropy,
    per_slide_losses,
    smooth_top1_svm,
)

F64 = torch.float64


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# --- smooth top-1 SVM -------------------------------------------------------------------


def test_svm_smooth_rows_match_hand_values() -> None:
    # [1, 2], y=0: augmented [1, 3], shifted [0, 2] -> log(1 + e^2)
    loss = smooth_top1_svm(_t([[1.0, 2.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(math.log(1 + math.e**2), abs=1e-12)
    # [3, 0], y=0: shifted [0, -2] -> log(1 + e^-2)
    loss = smooth_top1_svm(_t([[3.0, 0.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(math.log(1 + math.e**-2), abs=1e-12)
    # three classes [1, 2, 3], y=1: augmented [2, 2, 4], shifted [0, 0, 2]
    loss = smooth_top1_svm(_t([[1.0, 2.0, 3.0]]), torch.tensor([1]))
    assert loss.item() == pytest.approx(math.log(2 + math.e**2), abs=1e-12)


def test_svm_temperature_and_margin() -> None:
    # tau=2, alpha=0.5, [0, 1], y=0: shifted [0, 1.5] -> 2·log(1 + e^0.75)
    loss = smooth_top1_svm(_t([[0.0, 1.0]]), torch.tensor([0]), tau=2.0, alpha=0.5)
    assert loss.item() == pytest.approx(2 * math.log(1 + math.exp(0.75)), abs=1e-12)


def test_svm_falls_back_to_hard_hinge_on_large_gap() -> None:
    # tau=2, [0, 8], y=0: augmented [0, 9], gap 9 >= 6.91 -> hinge 9 (smooth would be 9.022)
    loss = smooth_top1_svm(_t([[0.0, 8.0]]), torch.tensor([0]), tau=2.0)
    assert loss.item() == pytest.approx(9.0, abs=1e-12)
    # confidently right: [20, 0], y=0 -> augmented [20, 1], hinge max(0, 1 - 20) = 0
    loss = smooth_top1_svm(_t([[20.0, 0.0]]), torch.tensor([0]))
    assert loss.item() == 0.0
    # mean over a smooth row and a hard row
    loss = smooth_top1_svm(_t([[1.0, 2.0], [10.0, 0.0]]), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((math.log(1 + math.e**2) + 11.0) / 2, abs=1e-12)
    # the gap threshold is configurable: gap 2 < 1.5 is false -> hard hinge 2
    loss = smooth_top1_svm(_t([[1.0, 2.0]]), torch.tensor([0]), hard_gap=1.5)
    assert loss.item() == pytest.approx(2.0, abs=1e-12)


def test_svm_huge_scores_stay_finite_with_gradients() -> None:
    scores = torch.tensor(
        [[1e30, -1e30], [-1e30, 1e30], [1e4, 1e4 + 1.0]], dtype=torch.float32, requires_grad=True
    )
    targets = torch.tensor([0, 0, 0])
    loss = smooth_top1_svm(scores, targets)
    loss.backward()
    assert torch.isfinite(loss) and scores.grad is not None
    assert bool(torch.isfinite(scores.grad).all())
    # rows: 0 (hinge), 2e30 + 1 (hinge), log(1 + e^2) (smooth, gap 2)
    expected = (0.0 + 2e30 + math.log(1 + math.e**2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_svm_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        smooth_top1_svm(_t([1.0, 2.0]), torch.tensor([0]))
    with pytest.raises(ValueError):
        smooth_top1_svm(_t([[1.0, 2.0]]), torch.tensor([2]))
    assert smooth_top1_svm(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)).item() == 0.0


# --- instance sampling ------------------------------------------------------------------

# sorted by attention among the 6 real patches: 1 (.30), 3 (.25), 5 (.18), 4 (.12), 0 (.10), 2 (.05)
ATT = _t([0.10, 0.30, 0.05, 0.25, 0.12, 0.18, 0.0, 0.0])
MASK = torch.tensor([True] * 6 + [False] * 2)
LABELS = torch.tensor([1, 1, 0, 1, 0, -1], dtype=torch.int8)  # unpadded: 6 of 8
CFG = SupervisionConfig(attention_k=4, annotated_positives=2)


def test_unannotated_tumour_slide_top_and_bottom_attention() -> None:
    idx, tgt = instance_targets(ATT, None, 1, None, MASK, CFG)
    assert idx.tolist() == [1, 3, 5, 4, 2, 0]  # bottom-2 skips the zero-attention padding
    assert tgt.tolist() == [1, 1, 1, 1, 0, 0]


def test_normal_slide_top_attention_are_negatives() -> None:
    idx, tgt = instance_targets(ATT, LABELS, 0, True, MASK, CFG)
    assert idx.tolist() == [1, 3, 5, 4] and tgt.tolist() == [0, 0, 0, 0]


def test_attention_rule_clips_to_real_patches_without_overlap() -> None:
    att = _t([0.5, 0.2, 0.3, 0.0, 0.0])
    mask = torch.tensor([True, True, True, False, False])
    cfg = SupervisionConfig(attention_k=8)
    idx, tgt = instance_targets(att, None, 1, None, mask, cfg)
    assert idx.tolist() == [0, 2, 1] and tgt.tolist() == [1, 1, 1]
    # 5 real patches, B = 4: top 4, and only 1 left for the bottom set
    att = _t([0.1, 0.3, 0.2, 0.25, 0.15])
    idx, tgt = instance_targets(att, None, 1, None, torch.ones(5, dtype=torch.bool), CFG)
    assert idx.tolist() == [1, 3, 2, 4, 0] and tgt.tolist() == [1, 1, 1, 1, 0]
    idx, tgt = instance_targets(att, None, 0, None, torch.ones(5, dtype=torch.bool), cfg)
    assert sorted(idx.tolist()) == [0, 1, 2, 3, 4] and tgt.tolist() == [0] * 5


def test_annotated_tumour_slide_complete_annotation() -> None:
    # tumour {0,1,3}: top-2 by attention = 1 (.30), 3 (.25); normal {2,4}: ceil(2/2)=1 -> 4 (.12)
    idx, tgt = instance_targets(ATT, LABELS, 1, True, MASK, CFG)
    assert idx.tolist() == [1, 3, 4] and tgt.tolist() == [1, 1, 0]


def test_annotated_tumour_slide_partial_annotation_has_no_negatives() -> None:
    for complete in (False, None):
        idx, tgt = instance_targets(ATT, LABELS, 1, complete, MASK, CFG)
        assert idx.tolist() == [1, 3] and tgt.tolist() == [1, 1]


def test_annotated_takes_all_when_fewer_than_b_gt() -> None:
    cfg = SupervisionConfig(attention_k=4, annotated_positives=512)
    idx, tgt = instance_targets(ATT, LABELS, 1, True, MASK, cfg)
    # all 3 tumour patches, ceil(3/2) = 2 negatives = both normal patches
    assert idx.tolist() == [0, 1, 3, 2, 4] and tgt.tolist() == [1, 1, 1, 0, 0]


def test_annotated_random_choice_is_seeded() -> None:
    labels = torch.tensor([1] * 10 + [0] * 10, dtype=torch.int8)
    att = torch.full((20,), 0.05, dtype=F64)
    mask = torch.ones(20, dtype=torch.bool)
    cfg = SupervisionConfig(annotated_positives=4)

    def run(seed: int) -> tuple[list[int], list[int]]:
        gen = torch.Generator().manual_seed(seed)
        idx, tgt = instance_targets(att, labels, 1, True, mask, cfg, generator=gen)
        return idx.tolist(), tgt.tolist()

    idx, tgt = run(0)
    assert run(0) == (idx, tgt)
    assert tgt == [1, 1, 1, 1, 0, 0]
    assert all(i < 10 for i in idx[:4]) and all(i >= 10 for i in idx[4:])
    assert len(set(idx)) == 6
    assert any(run(s)[0] != idx for s in range(1, 6))


def test_weak_mode_and_useless_labels_fall_back_to_attention() -> None:
    weak = SupervisionConfig(mode="weak", attention_k=4)
    idx, tgt = instance_targets(ATT, LABELS, 1, True, MASK, weak)
    assert idx.tolist() == [1, 3, 5, 4, 2, 0] and tgt.tolist() == [1, 1, 1, 1, 0, 0]
    # a tumour label only on padding does not make the slide annotated
    padded = torch.tensor([-1, -1, -1, -1, -1, -1, 1, 1], dtype=torch.int8)
    idx, tgt = instance_targets(ATT, padded, 1, True, MASK, CFG)
    assert idx.tolist() == [1, 3, 5, 4, 2, 0] and 6 not in idx.tolist()


def test_instance_targets_rejects_bad_rows() -> None:
    with pytest.raises(ValueError):
        instance_targets(ATT, None, 1, None, MASK[:4], CFG)
    with pytest.raises(ValueError):
        instance_targets(ATT, None, 1, None, torch.zeros(8, dtype=torch.bool), CFG)
    with pytest.raises(ValueError):
        instance_targets(ATT, torch.zeros(9, dtype=torch.int8), 1, None, MASK, CFG)


# --- attention regularisation -----------------------------------------------------------


def test_normalised_entropy_values_and_edge_cases() -> None:
    assert normalised_entropy(_t([0.25] * 4)).item() == pytest.approx(1.0, abs=1e-12)
    assert normalised_entropy(_t([0.5, 0.5, 0.0, 0.0])).item() == pytest.approx(0.5, abs=1e-12)
    x = _t([1.0, 0.0, 0.0]).requires_grad_(True)
    value = normalised_entropy(x)
    value.backward()
    assert value.item() == 0.0 and x.grad is not None and bool(torch.isfinite(x.grad).all())
    one = _t([1.0]).requires_grad_(True)
    value = normalised_entropy(one)
    value.backward()
    assert value.item() == 0.0 and one.grad is not None and one.grad.item() == 0.0


def test_attention_loss_normal_slide_is_minus_entropy() -> None:
    cfg = SupervisionConfig()
    ones = torch.ones(4, dtype=torch.bool)
    assert attention_loss(_t([0.25] * 4), None, 0, ones, cfg).item() == pytest.approx(-1.0)
    assert attention_loss(_t([0.5, 0.5, 0, 0]), None, 0, ones, cfg).item() == pytest.approx(-0.5)
    # padding is not part of |x|: two real patches, uniform -> -1
    mask = torch.tensor([True, True, False, False])
    assert attention_loss(_t([0.5, 0.5, 0, 0]), None, 0, mask, cfg).item() == pytest.approx(-1.0)
    # H([0.6, 0.4]) / log 2
    h = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4)) / math.log(2)
    assert attention_loss(_t([0.6, 0.4]), None, 0, torch.ones(2, dtype=torch.bool), cfg).item() == (
        pytest.approx(-h, abs=1e-12)
    )


def test_attention_loss_annotated_tumour_slide() -> None:
    cfg = SupervisionConfig()
    att = _t([0.1, 0.4, 0.2, 0.3]).requires_grad_(True)
    labels = torch.tensor([0, 1, 1, -1], dtype=torch.int8)
    loss = attention_loss(att, labels, 1, torch.ones(4, dtype=torch.bool), cfg)
    # normal mass 0.1, tumour mass 0.6, tumour renormalised [2/3, 1/3]
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) / math.log(2)
    assert loss.item() == pytest.approx(0.1 - 0.6 - h, abs=1e-12)
    loss.backward()
    assert att.grad is not None and att.grad[0].item() == pytest.approx(1.0)
    assert att.grad[3].item() == 0.0  # unknown patches are not pushed either way
    # a single tumour patch has no spread term
    single = attention_loss(
        _t([0.2, 0.5, 0.3]), torch.tensor([0, 1, -1]), 1, torch.ones(3, dtype=torch.bool), cfg
    )
    assert single.item() == pytest.approx(0.2 - 0.5, abs=1e-12)


def test_attention_loss_zero_cases() -> None:
    ones = torch.ones(4, dtype=torch.bool)
    att = _t([0.1, 0.4, 0.2, 0.3])
    assert attention_loss(att, None, 1, ones, SupervisionConfig()).item() == 0.0
    weak = SupervisionConfig(mode="weak")
    assert attention_loss(att, None, 0, ones, weak).item() == 0.0
    labels = torch.tensor([0, 1, 1, -1], dtype=torch.int8)
    assert attention_loss(att, labels, 1, ones, weak).item() == 0.0


# --- whole-batch loss -------------------------------------------------------------------


def _batch(requires_grad: bool = False) -> dict[str, object]:
    logits = _t([[2.0, 0.0], [0.0, 1.0]]).requires_grad_(requires_grad)
    attention = _t([[[0.6, 0.4, 0.0]], [[0.2, 0.5, 0.3]]]).requires_grad_(requires_grad)
    inst = _t(
        [[[0.0, 0.0], [3.0, 1.0], [9.0, 9.0]], [[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]]
    ).requires_grad_(requires_grad)
    return {
        "logits": logits,
        "attention": attention,
        "instance_logits": inst,
        "slide_labels": torch.tensor([0, 1]),
        "patch_labels": [None, torch.tensor([0, 1, -1], dtype=torch.int8)],
        "annotation_complete": [None, True],
        "mask": torch.tensor([[True, True, False], [True, True, True]]),
    }


def _ce(z0: float, z1: float, y: int) -> float:
    return math.log(math.exp(z0) + math.exp(z1)) - (z0, z1)[y]


BAG = [_ce(2, 0, 0), _ce(0, 1, 1)]
# slide 0 (normal, B=1): patch 0 -> 0; slide 1 (annotated): patch 1 -> 1, patch 0 -> 0
INST = [_ce(0, 0, 0), (_ce(0, 2, 1) + _ce(1, 0, 0)) / 2]
ATTN = [-(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)) / math.log(2)), 0.2 - 0.5]


def test_mixed_loss_matches_hand_values() -> None:
    cfg = SupervisionConfig(attention_k=1)
    out = mixed_supervision_loss(**_batch(), cfg=cfg)  # type: ignore[arg-type]
    totals = [0.7 * b + 0.3 * i + a for b, i, a in zip(BAG, INST, ATTN, strict=True)]
    assert out.per_slide.tolist() == pytest.approx(totals, abs=1e-12)
    assert out.total.item() == pytest.approx(sum(totals) / 2, abs=1e-12)
    assert out.bag.item() == pytest.approx(sum(BAG) / 2, abs=1e-12)
    assert out.instance.item() == pytest.approx(sum(INST) / 2, abs=1e-12)
    assert out.attention.item() == pytest.approx(sum(ATTN) / 2, abs=1e-12)
    assert (out.n_positive, out.n_negative, out.n_annotated) == (1, 2, 1)


def test_weak_mode_is_clam() -> None:
    cfg = SupervisionConfig(mode="weak", attention_k=1)
    out = mixed_supervision_loss(**_batch(), cfg=cfg)  # type: ignore[arg-type]
    # slide 1 by attention: top-1 patch 1 -> 1, bottom-1 patch 0 -> 0 (same patches here)
    totals = [0.7 * b + 0.3 * i for b, i in zip(BAG, INST, strict=True)]
    assert out.per_slide.tolist() == pytest.approx(totals, abs=1e-12)
    assert out.attention.item() == 0.0 and out.n_annotated == 0


def test_svm_instance_loss_and_no_instance_task() -> None:
    cfg = SupervisionConfig(attention_k=1, instance_loss="svm")
    out = mixed_supervision_loss(**_batch(), cfg=cfg)  # type: ignore[arg-type]
    # slide 0: [0, 0], y=0 -> shifted [0, 1] -> log(1 + e)
    svm0 = math.log(1 + math.e)
    assert out.per_slide[0].item() == pytest.approx(0.7 * BAG[0] + 0.3 * svm0 + ATTN[0])
    batch = _batch()
    batch["instance_logits"] = None
    out = mixed_supervision_loss(**batch, cfg=cfg)  # type: ignore[arg-type]
    assert out.per_slide.tolist() == pytest.approx([b + a for b, a in zip(BAG, ATTN, strict=True)])
    assert out.instance.item() == 0.0 and out.n_positive == out.n_negative == 0


def test_multi_branch_attention_uses_tumour_branch() -> None:
    batch = _batch()
    att = batch["attention"]
    assert isinstance(att, torch.Tensor)
    decoy = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=F64)[:, None]
    batch["attention"] = torch.cat([decoy, att], dim=1)  # branch 0 decoy, branch 1 = tumour
    cfg = SupervisionConfig(attention_k=1)
    out = mixed_supervision_loss(**batch, cfg=cfg)  # type: ignore[arg-type]
    totals = [0.7 * b + 0.3 * i + a for b, i, a in zip(BAG, INST, ATTN, strict=True)]
    assert out.per_slide.tolist() == pytest.approx(totals, abs=1e-12)
    batch["attention"] = torch.cat([decoy, att, att], dim=1)
    with pytest.raises(ValueError):
        mixed_supervision_loss(**batch, cfg=cfg)  # type: ignore[arg-type]


def test_per_slide_terms_depend_only_on_their_row() -> None:
    cfg = SupervisionConfig(attention_k=1)
    batch = _batch(requires_grad=True)
    losses = per_slide_losses(**batch, cfg=cfg)  # type: ignore[arg-type]
    losses[0].backward()
    for key in ("logits", "attention", "instance_logits"):
        grad = batch[key].grad  # type: ignore[union-attr]
        assert grad is not None and grad[1].abs().sum().item() == 0.0
        assert grad[0].abs().sum().item() > 0.0
    # and each slide alone (physical batch 1, no padding) gives the same value
    full = _batch()
    for i, n in enumerate((2, 3)):
        alone = per_slide_losses(
            full["logits"][i : i + 1],  # type: ignore[index]
            full["attention"][i : i + 1, :, :n],  # type: ignore[index]
            full["instance_logits"][i : i + 1, :n],  # type: ignore[index]
            full["slide_labels"][i : i + 1],  # type: ignore[index]
            full["patch_labels"][i : i + 1],  # type: ignore[index]
            full["annotation_complete"][i : i + 1],  # type: ignore[index]
            full["mask"][i : i + 1, :n],  # type: ignore[index]
            cfg,
        )
        assert alone.item() == pytest.approx(losses[i].item(), abs=1e-12)


def test_batch_shape_errors() -> None:
    cfg = SupervisionConfig()
    batch = _batch()
    batch["slide_labels"] = torch.tensor([0])
    with pytest.raises(ValueError):
        mixed_supervision_loss(**batch, cfg=cfg)  # type: ignore[arg-type]
    batch = _batch()
    batch["mask"] = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError):
        mixed_supervision_loss(**batch, cfg=cfg)  # type: ignore[arg-type]
