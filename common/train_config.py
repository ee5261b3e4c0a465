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
        description="step size = lr x sqrt(k), lr x k or lr for a step of k slides: a normal + "
        "tumour pair per step takes half as many Adam steps per epoch as CLAM's loop and "
        "without scaling falls behind it at equal epochs; sqrt kept up in bench/training.py, "
        "linear overshot",
    )
    weight_decay: float = Field(1e-5, ge=0, description="Adam (L2) weight decay")
    patience: int = Field(
        20, ge=1, description="epochs without a lower validation loss before stopping"
    )
    stopping_loss: Literal["slide", "supervised", "patch"] = Field(
        "slide",
        description="validation loss that early stopping and the best epoch go by: slide = "
        "the slide CE (CLAM, DESIGN §4.4); supervised = c_bag x slide CE + (1 - c_bag) x "
        "patch CE on the validation slides with patch labels; patch = that patch CE alone "
        "(localisation first: the slide CE often reaches its minimum once slides are told "
        "apart, long before the instance classifier has learnt the patches). supervised and "
        "patch apply in mixed mode only; weak mode and slide-label-only validation sets fall "
        "back to the slide CE",
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
        description="per-patch layers under bfloat16 autocast, or float32; auto = bfloat16 on a "
        "CPU with AMX (where it is several times faster) and on a GPU with native bfloat16, "
        "float16 with loss scaling on an older CUDA GPU (float32 under DP-SGD), float32 "
        "anywhere else; the site's device decides, the setting only says auto or which",
    )
    max_train_patches: int | None = Field(
        2048,
        ge=1,
        description="patches a training step takes from a larger slide, drawn at random and "
        "afresh every epoch (STAMP trains on 512): the per-patch layers are an epoch's cost; "
        "validation and inference use every patch; 0 or None = every patch (a tumour of "
        "a handful of patches in a huge slide is then never left out of a step)",
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
