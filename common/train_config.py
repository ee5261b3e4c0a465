"""Settings of the site-local trainer (DESIGN §4.4), shared by centralised and federated runs.

The federated client runs the same trainer for its local epochs, so the config is a strict,
frozen fedpath config that can be hashed into provenance records alongside the model config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fedpath.common.configbase import StrictModel
from fedpath.common.mil.config import SupervisionConfig

__all__ = ["TrainConfig"]


class TrainConfig(StrictModel):
    """Optimiser, schedule and early-stopping knobs; defaults are centralised CLAM's."""

    epochs: int = Field(200, ge=1, description="epochs run by one call of the trainer")
    lr: float = Field(
        2e-4,
        ge=0,
        description="Adam learning rate per slide, CLAM's one slide per step (0 freezes the "
        "model: a sanity baseline); a step of several slides uses it scaled by lr_scaling",
    )
    lr_scaling: Literal["sqrt", "linear", "none"] = Field(
        "sqrt",
        description="step size for a step of k slides: lr x sqrt(k), lr x k, or lr unchanged",
    )
    weight_decay: float = Field(1e-5, ge=0, description="Adam (L2) weight decay")
    patience: int = Field(
        20, ge=1, description="epochs without a lower validation loss before stopping"
    )
    stopping_loss: Literal["slide", "supervised", "patch"] = Field(
        "slide",
        description="validation loss for early stopping and the best epoch: slide CE, "
        "supervised (c_bag x slide CE + (1 - c_bag) x patch CE) or patch CE; the last two in "
        "mixed mode with labelled validation patches only, else the slide CE",
    )
    min_epochs: int = Field(
        50,
        ge=0,
        description="early stopping may only end training once this many epochs (counted from "
        "epoch 0, not from start_epoch) are done",
    )
    seed: int = Field(0, ge=0, description="seeds slide sampling, dropout and instance sampling")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="steps per epoch; None = one pass worth (epoch_schedule default)"
    )
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)
    grad_clip: float | None = Field(
        None, gt=0, description="clip the global gradient norm to this value (None = no clip)"
    )
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="per-patch layers in bfloat16 autocast or float32; auto: the device's fast "
        "low precision (AMX CPU or GPU; float16 with loss scaling on older GPUs), else float32",
    )
    max_train_patches: int | None = Field(
        2048,
        ge=1,
        description="patches a training step draws afresh each epoch from a larger slide "
        "(validation and inference use every patch); 0 or None = every patch",
    )
    max_batch_patches: int = Field(
        8192,
        ge=1,
        description="padded patches (B x longest bag) per forward pass: a step's slides are "
        "packed longest first into passes of at most this size, a longer slide runs alone",
    )

    @field_validator("max_train_patches", mode="before")
    @classmethod
    def _zero_is_every_patch(cls, value: object) -> object:
        """TOML has no null: ``max_train_patches = 0`` in a ``[train]`` table is "every
        patch", as the run config's ``max-train-patches = 0`` is."""
        return None if value == 0 else value
