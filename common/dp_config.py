"""Settings of slide-level DP-SGD (DESIGN §4.5), carried in every round's instructions.

Kept free of torch and Opacus: the ClientApp parses the round instructions (which embed this
config) before it decides whether to import anything heavy, and the server builds it from its
run config without any deep-learning import.

The privacy unit is one slide: the accountant counts how often a slide can be sampled and how
much noise covers its clipped gradient, so ε bounds what the released model updates say about
any single slide of a hospital (not about a patch, and not about a patient with several
slides unless each patient has one slide).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedpath.common.configbase import StrictModel

__all__ = ["PRIVACY_UNIT", "Accountant", "DPConfig"]

PRIVACY_UNIT = "slide"
"""What one DP 'sample' is in fedpath: a whole slide (one bag), never a patch."""

Accountant = Literal["rdp", "prv"]


class DPConfig(StrictModel):
    """Slide-level DP-SGD: Poisson sampling of slides, per-slide clipping, Gaussian noise.

    Exactly one of ``noise_multiplier`` and ``target_epsilon`` is given when ``enabled``: a
    target ε is turned into σ at each site for *its* sampling rate (``expected_batch_slides``
    / its number of training slides) and for the steps of ``planned_rounds`` rounds of local
    epochs, so every site ends the run at (about) the target if it trains every round.
    ``delta`` must also be below 1/N for a site with N training slides; that is checked at
    the site, the only place N is known.
    """

    enabled: bool = Field(False, description="train with slide-level DP-SGD")
    noise_multiplier: float | None = Field(
        None, gt=0, description="σ: noise std / clip norm; or give target_epsilon"
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="ε each site should reach after planned_rounds (σ is solved)"
    )
    max_grad_norm: float = Field(
        1.0, gt=0, description="C: every slide's gradient is clipped to this norm"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee; < 1/N")
    expected_batch_slides: int = Field(
        16,
        ge=1,
        description="expected logical batch of the Poisson sampling (16-32; batch 1 leaves "
        "~37% of steps empty and drowns the gradient in noise)",
    )
    accountant: Accountant = Field("rdp", description="Opacus accountant: rdp or prv")
    planned_rounds: int = Field(
        1, ge=1, description="rounds a target ε is spread over (the run's num-server-rounds)"
    )

    @model_validator(mode="after")
    def _one_noise_source(self) -> DPConfig:
        if not self.enabled:
            return self
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("DP-SGD needs a noise multiplier σ > 0 or a target ε > 0")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError(
                "give either a noise multiplier or a target ε, not both (σ is solved from ε)"
            )
        return self

    def describe(self) -> str:
        """One line for a run record: what was promised, in the user's terms."""
        if not self.enabled:
            return "off"
        noise = (
            f"σ = {self.noise_multiplier:g}"
            if self.noise_multiplier is not None
            else f"target ε = {self.target_epsilon:g} over {self.planned_rounds} round(s)"
        )
        return (
            f"slide-level DP-SGD per site (Opacus {self.accountant.upper()} accountant; "
            f"privacy unit: one {PRIVACY_UNIT}), δ = {self.delta:g}, clip C = "
            f"{self.max_grad_norm:g}, {noise}, expected batch {self.expected_batch_slides} slides"
        )
