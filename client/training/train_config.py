"""Settings of the site-local trainer (DESIGN §4.4), shared by centralised and federated runs.

The federated client runs the same trainer for its local epochs, so the config is a strict,
frozen fedpath config that can be hashed into provenance records alongside the model config.
"""

from __future__ import annotations

from pydantic import Field

from common.configbase import StrictModel
from common.mil.config import SupervisionConfig

__all__ = ["TrainConfig"]


class TrainConfig(StrictModel):
    """Optimiser, schedule and early-stopping knobs; defaults are centralised CLAM's."""

    epochs: int = Field(200, ge=1, description="epochs run by one call of the trainer")
    lr: float = Field(
        2e-4, ge=0, description="Adam learning rate (0 freezes the model: a sanity baseline)"
    )
    weight_decay: float = Field(1e-5, ge=0, description="Adam (L2) weight decay")
    patience: int = Field(
        20, ge=1, description="epochs without a lower validation slide loss before stopping"
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
