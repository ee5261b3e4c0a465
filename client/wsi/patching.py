"""Patch grid over the tissue, with every patch's exact tissue fraction (DESIGN §4.1).

CLAM decides per grid point with up to four ``cv2.pointPolygonTest`` calls per contour, in a
Python loop; on a slide with 10⁵ candidate points that dominates patching time and yields only a
yes/no. Here the mask is turned into a summed-area table once and the tissue fraction of every
candidate patch comes out of a few vectorised gathers.

Exact area weighting. A mask pixel (i, j) covers level-0 [j·dx, (j+1)·dx) × [i·dy, (i+1)·dy).
Let F(u, v) be the integral of the mask over [0, u) × [0, v) in mask-pixel units, for real u,
v. Because the mask is constant inside each pixel, F is *bilinear* inside every cell and equals
the integral image at integer corners; bilinear interpolation of the integral image therefore
gives F exactly, not approximately. A patch [x, x+p) × [y, y+p) covers mask area
F(u1, v1) − F(u0, v1) − F(u1, v0) + F(u0, v0) with u = x/dx, v = y/dy, which is the
overlap-area-weighted sum of mask pixels; dividing by the patch area (p²/(dx·dy)) gives the
fraction of the footprint that is tissue. Footprint parts outside the mask count as glass.
Snapping to whole mask pixels ([floor(x/ds), ceil((x+p)/ds))) would instead overstate the
fraction of patches at tissue borders by up to a mask pixel per side: with 256-px patches on a
64× mask that is a 25 % error.

The coordinate file (``patches/<slide_id>.h5``) follows CLAM/TRIDENT: dataset ``coords`` with
its attributes on the dataset (where those readers look), copied to the file root for tools that
read root attributes, plus ``tissue_fraction``; ``fedpath prepare`` adds the annotation's
``patch_labels`` and ``tumour_fraction`` and its provenance attributes (README, "Patch files").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np

from fedpath.client.wsi.reader import SlideInfo
from fedpath.client.wsi.resolution import ReadPlan
from fedpath.client.wsi.tissue import TissueMask
from fedpath.common import __version__
from fedpath.common.errors import FeatureBagError
from fedpath.common.featurebag import AtomicH5File, plain_value

_FRACTION_EPS = 1e-9
"""Slack when comparing fractions to the threshold: exact ties must not be lost to rounding."""


@dataclass(frozen=True)
class PatchGrid:
    """Kept patches: level-0 top-left corners (row-major) and the tissue share of each."""

    coords: np.ndarray
    tissue_fraction: np.ndarray
    patch_size_level0: int
    step_level0: int

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def _axis_positions(
    start: float, stop: float, slide_extent: int, patch: int, step: int
) -> np.ndarray:
    """Grid positions from ``start`` while < ``stop``, keeping only patches inside the slide."""
    last = min(stop, slide_extent - patch + 1)
    first = max(0, int(start))
    if last <= first:
        return np.zeros(0, dtype=np.int64)
    return np.arange(first, last, step, dtype=np.int64)


def _interpolation_weights(positions: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower cell index and fractional offset of each (clipped) position in [0, cells]."""
    clipped = np.clip(positions, 0.0, float(cells))
    lower = np.minimum(np.floor(clipped), cells - 1).astype(np.int64)
    return lower, clipped - lower


def _integral_at(table: np.ndarray, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """F(u, v) on the outer grid v × u: bilinear interpolation of the integral image."""
    rows, cols = table.shape[0] - 1, table.shape[1] - 1
    i, ty = _interpolation_weights(v, rows)
    j, tx = _interpolation_weights(u, cols)
    along_v = table[i, :] * (1.0 - ty)[:, None] + table[i + 1, :] * ty[:, None]
    return along_v[:, j] * (1.0 - tx)[None, :] + along_v[:, j + 1] * tx[None, :]


def tissue_fractions(
    mask: TissueMask, xs: np.ndarray, ys: np.ndarray, patch_size_level0: int
) -> np.ndarray:
    """Exact tissue fraction of the patch at every (y, x) of the grid ``ys`` × ``xs``.

    Returns a len(ys) × len(xs) float64 array; see the module docstring for why the bilinear
    interpolation of the integral image is exact for a piecewise-constant mask.
    """
    dx, dy = mask.downsample
    if xs.size == 0 or ys.size == 0:
        return np.zeros((ys.size, xs.size), dtype=np.float64)
    table = cv2.integral(mask.mask.astype(np.uint8), sdepth=cv2.CV_64F)
    u0, u1 = xs / dx, (xs + patch_size_level0) / dx
    v0, v1 = ys / dy, (ys + patch_size_level0) / dy
    area = (
        _integral_at(table, v1, u1)
        - _integral_at(table, v0, u1)
        - _integral_at(table, v1, u0)
        + _integral_at(table, v0, u0)
    )
    patch_area_px = (patch_size_level0 / dx) * (patch_size_level0 / dy)
    return np.clip(area / patch_area_px, 0.0, 1.0)


def tissue_bbox_level0(mask: TissueMask) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) level-0 extent of the tissue, or None when the mask is empty."""
    rows = np.flatnonzero(mask.mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.mask.any(axis=0))
    dx, dy = mask.downsample
    return (
        cols[0] * dx,
        rows[0] * dy,
        (cols[-1] + 1) * dx,
        (rows[-1] + 1) * dy,
    )


def _empty_grid(patch_size_level0: int, step_level0: int) -> PatchGrid:
    return PatchGrid(
        coords=np.zeros((0, 2), dtype=np.int64),
        tissue_fraction=np.zeros(0, dtype=np.float32),
        patch_size_level0=patch_size_level0,
        step_level0=step_level0,
    )


def patch_grid(
    mask: TissueMask,
    slide_dims: tuple[int, int],
    patch_size_level0: int,
    step_level0: int,
    min_tissue_fraction: float,
) -> PatchGrid:
    """Patches on a regular grid anchored at the tissue's top-left, kept when tissue ≥ threshold.

    The grid starts at the tissue bounding box (floored to a level-0 pixel) so it does not
    depend on where the glass ends; only patches fully inside the slide are candidates. An
    empty mask gives an empty grid (the caller decides whether that is an error).
    """
    if patch_size_level0 <= 0 or step_level0 <= 0:
        raise ValueError(
            f"patch size and step must be positive, got {patch_size_level0}, {step_level0}"
        )
    bbox = tissue_bbox_level0(mask)
    if bbox is None:
        return _empty_grid(patch_size_level0, step_level0)
    x0, y0, x1, y1 = bbox
    width, height = slide_dims
    xs = _axis_positions(np.floor(x0), x1, width, patch_size_level0, step_level0)
    ys = _axis_positions(np.floor(y0), y1, height, patch_size_level0, step_level0)
    fractions = tissue_fractions(mask, xs, ys, patch_size_level0)
    keep_y, keep_x = np.nonzero(fractions >= min_tissue_fraction - _FRACTION_EPS)
    coords = np.stack((xs[keep_x], ys[keep_y]), axis=1).astype(np.int64)
    return PatchGrid(
        coords=coords.reshape(-1, 2),
        tissue_fraction=fractions[keep_y, keep_x].astype(np.float32),
        patch_size_level0=patch_size_level0,
        step_level0=step_level0,
    )


def coords_attrs(grid: PatchGrid, plan: ReadPlan, info: SlideInfo) -> dict[str, Any]:
    """Attributes of the ``coords`` dataset, named as CLAM and TRIDENT readers expect."""
    level_w, level_h = info.level_dimensions[plan.level]
    attrs: dict[str, Any] = {
        "patch_size": int(plan.read_size),
        "patch_level": int(plan.level),
        "downsample": float(plan.level_downsample),
        "level_dim": np.array([level_w, level_h], dtype=np.int64),
        "downsampled_level_dim": np.array([level_w, level_h], dtype=np.int64),
        "patch_size_level0": int(grid.patch_size_level0),
        "step_level0": int(grid.step_level0),
        "target_patch_size": int(plan.patch_size),
        "target_mpp": float(plan.target_mpp),
        "target_magnification": float(10.0 / plan.target_mpp),
        "level0_mpp": float(plan.level0_mpp),
        "mpp_source": info.mpp_source,
        "name": info.slide_id,
        "fedpath_version": __version__,
    }
    if info.objective_power is not None:
        attrs["level0_magnification"] = float(info.objective_power)
    return attrs


def write_coords_h5(
    path: Path,
    grid: PatchGrid,
    plan: ReadPlan,
    info: SlideInfo,
    *,
    patch_labels: np.ndarray | None = None,
    tumour_fraction: np.ndarray | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> None:
    """Write ``coords`` + ``tissue_fraction`` atomically (a crash leaves no partial file).

    ``patch_labels`` (int8: 1 tumour, 0 normal, -1 unknown) and ``tumour_fraction`` are the
    annotation's labels of the same patches; ``provenance`` (settings hash, slide fingerprint)
    goes to the file root only, where ``fedpath prepare`` looks before reusing the patches.
    """
    n = len(grid)
    if grid.coords.shape != (n, 2) or grid.tissue_fraction.shape != (n,):
        raise FeatureBagError(
            str(path),
            f"coords {grid.coords.shape} and tissue_fraction {grid.tissue_fraction.shape} "
            "do not describe the same patches",
        )
    for name, extra in (("patch_labels", patch_labels), ("tumour_fraction", tumour_fraction)):
        if extra is not None and extra.shape != (n,):
            raise FeatureBagError(str(path), f"{name} {extra.shape} does not match {n} patches")
    attrs = coords_attrs(grid, plan, info)
    with AtomicH5File(path) as out:  # a refused write: one OutputWriteError, no temporary
        fh = out.file
        coords = fh.create_dataset("coords", data=grid.coords.astype(np.int64))
        fh.create_dataset("tissue_fraction", data=grid.tissue_fraction.astype(np.float32))
        if patch_labels is not None:
            fh.create_dataset("patch_labels", data=patch_labels.astype(np.int8))
        if tumour_fraction is not None:
            fh.create_dataset("tumour_fraction", data=tumour_fraction.astype(np.float32))
        for key, value in attrs.items():
            coords.attrs[key] = value
            fh.attrs[key] = value
        for key, value in (provenance or {}).items():
            fh.attrs[key] = value


def read_coords_h5(path: Path) -> tuple[PatchGrid, dict[str, Any]]:
    """Read a coordinate file written here or by CLAM/TRIDENT (attributes on ``coords``).

    Files without ``tissue_fraction`` (CLAM, TRIDENT) get NaN fractions; a missing
    ``patch_size_level0`` is derived from ``patch_size`` × ``downsample`` as CLAM implies.
    """
    try:
        with h5py.File(path, "r") as fh:
            if "coords" not in fh:
                raise FeatureBagError(str(path), "has no 'coords' dataset")
            coords = np.asarray(fh["coords"][()])
            attrs = {k: plain_value(v) for k, v in fh.attrs.items()}
            attrs.update({k: plain_value(v) for k, v in fh["coords"].attrs.items()})
            fraction = (
                np.asarray(fh["tissue_fraction"][()], dtype=np.float32)
                if "tissue_fraction" in fh
                else None
            )
    except OSError as exc:
        raise FeatureBagError(str(path), f"cannot be read as HDF5 ({exc})") from exc
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureBagError(str(path), f"'coords' must be N×2, got shape {coords.shape}")
    if fraction is None:
        fraction = np.full(coords.shape[0], np.nan, dtype=np.float32)
    if fraction.shape != (coords.shape[0],):
        raise FeatureBagError(
            str(path), f"'tissue_fraction' has {fraction.shape}, coords has {coords.shape[0]} rows"
        )
    size0 = attrs.get("patch_size_level0")
    if size0 is None:
        if "patch_size" not in attrs:
            raise FeatureBagError(str(path), "has neither 'patch_size_level0' nor 'patch_size'")
        downsample = attrs.get("downsample", 1.0)
        ds = float(np.mean(downsample)) if isinstance(downsample, list) else float(downsample)
        size0 = round(float(attrs["patch_size"]) * ds)
    step0 = attrs.get("step_level0", size0)
    grid = PatchGrid(
        coords=coords.astype(np.int64),
        tissue_fraction=fraction,
        patch_size_level0=int(size0),
        step_level0=int(step0),
    )
    return grid, attrs
