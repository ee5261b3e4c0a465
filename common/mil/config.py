"""Typed settings of the MIL model and of mixed supervision, with DESIGN §4.3-4.4 defaults.

The model config travels with every checkpoint and every federated run: server and sites must
build the same architecture, so it is strict and hashable like every fedpath config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedpath.common.configbase import StrictModel


class ModelConfig(StrictModel):
    """Which attention-MIL architecture, and its sizes."""

    kind: Literal["abmil", "clam_sb", "clam_mb"] = "clam_sb"
    size: Literal["small", "big"] = Field(
        "small", description="attention width 256 (small) or 384 (big)"
    )
    feature_dim: int = Field(1280, ge=1, description="D of the feature bags")
    hidden_dim: int = Field(512, ge=8, description="width of h' = ReLU(W1 h)")
    n_classes: int = Field(2, ge=2)
    dropout: float = Field(0.25, ge=0, lt=1)
    gated: bool = Field(True, description="gated attention (tanh ⊙ sigmoid)")

    @property
    def attention_dim(self) -> int:
        return 256 if self.size == "small" else 384


class SupervisionConfig(StrictModel):
    """Mixed-supervision loss and sampling knobs (MS-CLAM); ``weak`` ignores patch labels."""

    mode: Literal["weak", "mixed"] = "mixed"
    bag_weight: float = Field(0.7, ge=0, le=1, description="c_bag in L = c·CE + (1-c)·L_inst")
    instance_loss: Literal["ce", "svm"] = "ce"
    svm_tau: float = Field(1.0, gt=0, description="smooth top-1 SVM temperature τ")
    svm_alpha: float = Field(1.0, gt=0, description="smooth top-1 SVM margin α")
    svm_hard_gap: float = Field(
        6.91, gt=0, description="top-2 gap at which the smooth SVM falls back to the hard hinge"
    )
    annotated_positives: int = Field(
        512, ge=1, description="B_gt: annotated tumour patches sampled as positives"
    )
    attention_k: int = Field(8, ge=1, description="B: top/bottom-attention patches sampled")
    attention_weight: float = Field(1.0, ge=0, description="λ_att")
    tumour_class: int = Field(1, ge=0, description="index of the tumour label")
    pair_normal_tumour: bool = Field(True, description="pair a normal and a tumour slide")
    oversample_weight: float = Field(90.0, ge=1, description="w0 for annotated slides")
    oversample_decay: float = Field(0.9, gt=0, le=1, description="w0 decay per epoch")
