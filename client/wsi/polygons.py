"""The one in-memory form of a tumour outline, whatever file it came from.

Pathologists annotate in QuPath or ASAP; both formats are read into these level-0 polygons
with holes, split into tumour and exclusion sets, so that the rest of the pipeline never
needs to know where an outline came from. Kept in a module of its own, with no dependencies
on the rest of the package, so that the format readers/writers, the per-patch fraction code
and the synthetic-slide generator can all share it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True, eq=False)
class Polygon:
    """One outline in level-0 pixels: an open exterior ring (no repeated closing vertex) and holes.

    Arrays are copied to read-only float64 so a polygon can be shared between threads and
    stored in a frozen annotation without anyone mutating it afterwards. ``eq=False`` because
    element-wise array comparison has no single truth value.
    """

    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "exterior", _as_ring(self.exterior, "exterior"))
        object.__setattr__(
            self, "holes", tuple(_as_ring(h, f"hole {i}") for i, h in enumerate(self.holes))
        )


@dataclass(frozen=True)
class TumourAnnotation:
    """Everything one annotation file says about tumour; empty ``tumour`` means no tumour.

    The other fields say what else the file held, so that a file yielding no tumour can be
    explained ("classes found: Stroma (3)") rather than silently read as all normal.
    """

    source: Path
    tumour: tuple[Polygon, ...]
    exclusions: tuple[Polygon, ...]
    classes_found: dict[str, int] = field(default_factory=dict, compare=False)
    """Outlines per class or group name as written, in file order ("Unclassified": none)."""
    unknown_classes: tuple[str, ...] = ()
    """Names found that are in none of the configured class lists."""
    ignored_geometries: dict[str, int] = field(default_factory=dict, compare=False)
    """Outlines of a tumour or exclusion class skipped because they have no area (points,
    lines), by geometry type."""


def _as_ring(ring: object, what: str) -> np.ndarray:
    arr = np.array(ring, dtype=np.float64, copy=True)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what}: expected a K×2 array of (x, y), got shape {arr.shape}")
    if len(arr) > 1 and np.array_equal(arr[0], arr[-1]):
        arr = arr[:-1].copy()
    arr.setflags(write=False)
    return arr
