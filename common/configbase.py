"""Base class for every fedpath config: strict, immutable, validated on construction.

``extra="forbid"`` turns a misspelt option into an error instead of a silently ignored
default; ``frozen=True`` lets configs be hashed into provenance records and shared safely.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown fields and cannot be mutated."""

    model_config = ConfigDict(extra="forbid", frozen=True)
