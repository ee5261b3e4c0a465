"""Tiny pyramidal TIFFs for tests, in the layout OpenSlide accepts (shared/data/README.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def write_pyramid(
    path: Path,
    rgb: np.ndarray,
    *,
    mpp: float | None = 0.5,
    levels: int = 3,
    compression: str = "zlib",
    tile: tuple[int, int] | None = (256, 256),
    description: str | None = None,
) -> Path:
    """One top-level page per level (each half the previous), reduced levels flagged."""
    with tifffile.TiffWriter(path) as tw:
        level = rgb
        for index in range(levels):
            kwargs: dict[str, object] = {"compression": compression, "photometric": "rgb"}
            if tile is not None:
                kwargs["tile"] = tile
            if index:
                kwargs["subfiletype"] = 1
            elif description is not None:
                kwargs["description"] = description
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * 2**index)
                kwargs.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
            tw.write(level, **kwargs)
            level = np.ascontiguousarray(level[::2, ::2])
    return path
