"""Turn a physical target (µm/px, patch side) into a concrete read plan for one slide's pyramid.

Patches must cover the same tissue area at every hospital whatever its scanner (0.25 µm/px at
40×, 0.5 at 20×, odd values like 0.499), otherwise features are not comparable across sites.
The plan says which level to read, how many pixels to read there, and the footprint and step in
level-0 pixels that the patch grid uses. Pure arithmetic, no OpenSlide, so it is unit-tested on
many pyramids.

Rules:
- Level: the *coarsest* level whose mpp ≤ target·(1 + level_tolerance). Reading a finer level
  and shrinking is always right; reading a coarser one would upsample (invent detail). Only
  when even level 0 is coarser than that do we read level 0 and upsample.
- Read size: when the chosen level's mpp is within the relative tolerance of the target
  (|mpp/target − 1| ≤ level_tolerance), the level *is* the target resolution and the patch is
  read at exactly ``patch_size`` (no resampling: a 0.499 µm/px slide gives 256 px reads, not
  257, as CLAM and TRIDENT would do for a 20× slide). Otherwise
  ``read_size = round_half_up(patch_size · target / level_mpp)``.
- Footprint: ``patch_size_level0 = round_half_up(read_size · level_downsample)``; the grid step
  is computed the same way from ``cfg.step``, so with no overlap step == footprint exactly and
  neighbouring patches tile the slide without gaps or overlaps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fedpath.client.config import ResolutionConfig


@dataclass(frozen=True)
class ReadPlan:
    """Where and how much to read for each patch of one slide."""

    level: int
    level_downsample: float
    level_mpp: float
    read_size: int
    patch_size: int
    patch_size_level0: int
    step_level0: int
    target_mpp: float
    level0_mpp: float

    @property
    def needs_resize(self) -> bool:
        """True when reads must be resampled to ``patch_size`` before the encoder sees them."""
        return self.read_size != self.patch_size


def round_half_up(value: float) -> int:
    """Round to nearest, halves away from zero (Python's round() is banker's: 0.5 → 0)."""
    return math.floor(value + 0.5)


_REL_EPS = 1e-9
"""Slack on tolerance comparisons so that e.g. 0.55 vs 0.5·1.1 is not lost to float rounding."""


def _choose_level(level_mpps: Sequence[float], target_mpp: float, tolerance: float) -> int:
    limit = target_mpp * (1.0 + tolerance + _REL_EPS)
    candidates = [i for i, m in enumerate(level_mpps) if m <= limit]
    if not candidates:
        return int(min(range(len(level_mpps)), key=lambda i: level_mpps[i]))
    return max(candidates, key=lambda i: level_mpps[i])


def _size_at_level(size: int, target_mpp: float, level_mpp: float, matches: bool) -> int:
    if matches:
        return size
    return max(1, round_half_up(size * target_mpp / level_mpp))


def plan_read(
    level0_mpp: float, level_downsamples: Sequence[float], cfg: ResolutionConfig
) -> ReadPlan:
    """The read plan that yields ``cfg.patch_size`` px patches at ``cfg.target_mpp``."""
    if not (math.isfinite(level0_mpp) and level0_mpp > 0):
        raise ValueError(f"level-0 mpp must be a positive number, got {level0_mpp}")
    if not level_downsamples:
        raise ValueError("a slide needs at least one pyramid level")
    if any(not (math.isfinite(d) and d > 0) for d in level_downsamples):
        raise ValueError(f"level downsamples must be positive, got {list(level_downsamples)}")
    level_mpps = [level0_mpp * float(d) for d in level_downsamples]
    level = _choose_level(level_mpps, cfg.target_mpp, cfg.level_tolerance)
    level_mpp = level_mpps[level]
    downsample = float(level_downsamples[level])
    matches = abs(level_mpp / cfg.target_mpp - 1.0) <= cfg.level_tolerance + _REL_EPS
    read_size = _size_at_level(cfg.patch_size, cfg.target_mpp, level_mpp, matches)
    read_step = _size_at_level(cfg.step, cfg.target_mpp, level_mpp, matches)
    return ReadPlan(
        level=level,
        level_downsample=downsample,
        level_mpp=level_mpp,
        read_size=read_size,
        patch_size=cfg.patch_size,
        patch_size_level0=max(1, round_half_up(read_size * downsample)),
        step_level0=max(1, round_half_up(read_step * downsample)),
        target_mpp=cfg.target_mpp,
        level0_mpp=level0_mpp,
    )
