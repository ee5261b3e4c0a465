"""Periodic H&E concentration textures ("banks") for normal tissue and tumour.

Drawing every nucleus of a 60,000-pixel slide would take minutes; instead each slide gets two
square, *periodic* texture banks (normal, tumour; optionally the low-grade tumour component
and its benign mimic) of a few mm² drawn once, and level-0 tiles are crops of them.
Periodicity (FFT noise, nuclei copied across the wrap) means a crop may straddle the bank edge
without a seam, so a whole super-tile of the slide can map onto one bank under a random offset
and dihedral transform (see ``BankView``): seams only appear between super-tiles, not between
tiles, and neighbouring super-tiles look different.

All sizes are physical (µm) and converted with the slide's µm/px, so a 40× slide shows the
same cells twice as large as a 20× one, as a real scanner would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from fedpath.common.errors import ConfigError

TILE = 256
"""Tile side of the TIFF and the largest crop taken from a bank (its wrap padding)."""

# The low-grade component (``_low_grade_texture``), tuned against EfficientNet-Lite0 features
# of prepared synthetic slides (two hospitals, 32 pool + 16 test slides, 50-80 % of each
# tumour low-grade; the same probes as bench/accuracy.py's feature ceiling by grade): a linear
# probe trained on high-grade vs normal patches ranks low-grade patches above normal ones
# with AUC 0.77 (it was 0.91 with the first constants), while a probe given low-grade labels
# separates them at 0.996. So what slide labels teach (the high-grade pattern) misses most of
# it, and patch labels can still teach it.
LOW_GRADE_CORD_UM = 40.0
"""Correlation length of the field whose level sets the cords follow."""
LOW_GRADE_CORD_FREQ = 1.5
"""Cords per unit of that (unit-variance) field: several roughly parallel cords per tubule."""
LOW_GRADE_CORD_WIDTH = 0.12
"""Share of each level-set period covered by a cord (about an eighth of the area)."""
LOW_GRADE_CELL_EOSIN = 0.46
"""Eosin of the cords' cytoplasm: as pink as the stroma around them (stroma 0.46-0.6,
high-grade cytoplasm 0.29), so colour does not give the cords away."""
LOW_GRADE_CELL_HAEM = 0.06
"""Haematoxylin of that cytoplasm (stroma 0.05, high-grade 0.2)."""
LOW_GRADE_CELL_AREA_UM2 = 70.0
"""Candidate nucleus per this many µm² (kept only inside cords)."""
LOW_GRADE_NUCLEUS_UM = (3.0, 3.8)
"""Semi-major axis, µm: barely enlarged (high-grade 4.5-7.5, lymphocytes 2.6-3.4)."""
LOW_GRADE_NUCLEUS_H = (0.25, 0.38)
"""Haematoxylin of the pale vesicular nuclei (high-grade 0.6-1.75, normal 0.9-1.9)."""
LOW_GRADE_NUCLEUS_RIM: tuple[float, float] | None = (0.25, 0.45)
"""Haematoxylin added along the membrane: the vesicular nuclei's thin dark rim."""

# The benign mimic (``_mimic_texture``): benign tubules and ducts, sclerosing adenosis, in
# normal tissue. Slide labels cannot tell it from low-grade carcinoma, so without it "cords of
# cells in stroma" would be tumour evidence by itself and weak supervision would find the
# low-grade component for free; with it, only the cells (small, dark, uniform nuclei here,
# larger pale vesicular ones there) separate them, which patch labels teach. The architecture
# (cords, lumens, cytoplasm, cell density) is the low-grade texture's: its LOW_GRADE_CORD_* and
# LOW_GRADE_CELL_* constants, read at call time, drive both.
MIMIC_NUCLEUS_UM = (2.6, 3.2)
"""Semi-major axis, µm: small resting epithelium (low-grade 3.0-3.8, lymphocytes 2.6-3.4)."""
MIMIC_NUCLEUS_H = (1.2, 1.6)
"""Haematoxylin of the dense, dark benign nuclei (low-grade 0.25-0.38, fibroblasts 0.9-1.3).
Tuned on prepared slides like the low-grade constants: a probe given the labels tells
low-grade from mimic patches at AUC 0.96-0.97 (0.91 with 0.8-1.1), a probe trained on
high-grade vs normal only at 0.70, and scores the mimic above plain stroma at 0.62."""
MIMIC_NUCLEUS_RIM: tuple[float, float] | None = None
"""Membrane haematoxylin; None: no vesicular rim (solid chromatin, as benign cells have)."""


@dataclass(frozen=True)
class TextureBank:
    """An H×W×2 (c_H, c_E) float32 texture, periodic with period ``size``, wrap-padded by TILE.

    The padding lets any TILE×TILE crop starting in [0, size) be a plain slice (a view), which
    keeps the per-tile cost to a copy.
    """

    size: int
    data: np.ndarray
    mean: np.ndarray  # (2,) float32 mean concentration, for variance-preserving blends

    def crop(self, row: int, col: int, n: int = TILE) -> np.ndarray:
        return self.data[row : row + n, col : col + n]


@dataclass(frozen=True)
class TextureBanks:
    normal: TextureBank
    tumour: TextureBank
    low_grade: TextureBank | None = None
    """The subtle (well-differentiated) tumour component; None when the slide has none."""
    mimic: TextureBank | None = None
    """Benign cords and tubules in normal tissue that mimic the low-grade component; None when
    the slide has none."""


# --------------------------------------------------------------------------------------------
# Periodic noise and nuclei
# --------------------------------------------------------------------------------------------


def _spectral_field(
    rng: np.random.Generator,
    size: int,
    sigma_px: float,
    across_px: float | None = None,
    angle: float = 0.0,
) -> np.ndarray:
    """Zero-mean, unit-variance periodic Gaussian field, built in the Fourier domain.

    Isotropic with correlation ``sigma_px``, or, with ``across_px``, elongated along ``angle``
    (radians, image x towards y): streaks that read as collagen fibres. Smooth isotropic
    fields are synthesised on a coarser periodic grid and interpolated up (with wrap padding,
    so still periodic): a 2048² low-frequency field then costs a 128² FFT.
    """
    factor = 1
    if across_px is None:
        while factor * 2 <= sigma_px / 3.0 and size % (factor * 2) == 0 and size // factor >= 64:
            factor *= 2
    n = size // factor
    sigma = sigma_px / factor
    ky = np.fft.fftfreq(n).astype(np.float32)[:, None]
    kx = np.fft.rfftfreq(n).astype(np.float32)[None, :]
    if across_px is None:
        expo = (sigma**2) * (kx * kx + ky * ky)
    else:
        along = kx * math.cos(angle) + ky * math.sin(angle)
        across = -kx * math.sin(angle) + ky * math.cos(angle)
        expo = (sigma**2) * along * along + ((across_px / factor) ** 2) * across * across
    transfer = np.exp(np.float32(-2.0 * math.pi**2) * expo)
    # Uniform rather than Gaussian white noise: 5× cheaper to draw, and the filtered field is
    # a sum over many frequencies, hence Gaussian anyway (central limit).
    white = rng.random((*transfer.shape, 2), dtype=np.float32)
    white -= np.float32(0.5)
    field = np.fft.irfft2(white.view(np.complex64)[..., 0] * transfer, s=(n, n))
    if factor > 1:
        pad = 2
        padded = np.pad(field, pad, mode="wrap")
        up = cv2.resize(padded, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
        field = up[pad * factor : pad * factor + size, pad * factor : pad * factor + size]
    field = np.ascontiguousarray(field, dtype=np.float32)
    mean, std = cv2.meanStdDev(field)
    field -= np.float32(mean[0, 0])
    return field / np.float32(std[0, 0]) if std[0, 0] > 0 else field


def _wrap_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur that keeps the texture periodic (wrap padding, then crop)."""
    if sigma_px <= 0:
        return img
    pad = max(1, math.ceil(3 * sigma_px))
    padded = np.pad(img, ((pad, pad), (pad, pad)) + ((0, 0),) * (img.ndim - 2), mode="wrap")
    blurred = cv2.GaussianBlur(padded, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT)
    return np.ascontiguousarray(blurred[pad:-pad, pad:-pad])


@dataclass(frozen=True)
class _Nuclei:
    """Vectorised description of N nuclei in bank pixels."""

    centers: np.ndarray  # N×2 float (x, y)
    major: np.ndarray  # N semi-axis px
    minor: np.ndarray  # N semi-axis px
    angle: np.ndarray  # N radians
    irregularity: float
    value: np.ndarray  # N haematoxylin concentration


def _nucleus_outlines(nuc: _Nuclei, rng: np.random.Generator, vertices: int = 16) -> np.ndarray:
    """N×V×2 float outlines: an ellipse with a smoothed random radius (pleomorphism)."""
    n = len(nuc.centers)
    t = np.linspace(0.0, 2 * math.pi, vertices, endpoint=False)[None, :]
    a, b = nuc.major[:, None], nuc.minor[:, None]
    r = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
    jitter = rng.standard_normal((n, vertices))
    jitter = 0.5 * jitter + 0.25 * (np.roll(jitter, 1, axis=1) + np.roll(jitter, -1, axis=1))
    r = r * np.clip(1.0 + nuc.irregularity * jitter, 0.5, 1.6)
    x, y = r * np.cos(t), r * np.sin(t)
    ca, sa = np.cos(nuc.angle)[:, None], np.sin(nuc.angle)[:, None]
    px = nuc.centers[:, :1] + x * ca - y * sa
    py = nuc.centers[:, 1:] + x * sa + y * ca
    return np.stack([px, py], axis=-1)


_SHIFT = 2  # fixed-point bits for sub-pixel polygon vertices


def _wrapped_copies(outlines: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Outlines plus their copies shifted by ±size where they cross the bank edge."""
    lo = outlines.min(axis=1)
    hi = outlines.max(axis=1)
    parts, index = [outlines], [np.arange(len(outlines))]
    for dx in (-size, 0, size):
        for dy in (-size, 0, size):
            if dx == 0 and dy == 0:
                continue
            keep = (
                (lo[:, 0] + dx < size)
                & (hi[:, 0] + dx >= 0)
                & (lo[:, 1] + dy < size)
                & (hi[:, 1] + dy >= 0)
            )
            if keep.any():
                parts.append(outlines[keep] + np.array([dx, dy], dtype=outlines.dtype))
                index.append(np.flatnonzero(keep))
    # Paint in nucleus order, copies included: overlaps then stack the same way on both sides
    # of the wrap, which keeps the bank exactly periodic.
    all_index = np.concatenate(index)
    order = np.argsort(all_index, kind="stable")
    return np.concatenate(parts)[order], all_index[order]


def _draw_nuclei(
    canvas: np.ndarray, nuc: _Nuclei, rng: np.random.Generator, rim: np.ndarray | None = None
) -> np.ndarray:
    """Paint nuclei into ``canvas`` (in place, later ones on top); return their uint8 mask.

    ``rim`` (N, haematoxylin added along the membrane) gives vesicular nuclei their dark rim.
    """
    size = canvas.shape[0]
    outlines, index = _wrapped_copies(_nucleus_outlines(nuc, rng), size)
    pts = np.round(outlines * (1 << _SHIFT)).astype(np.int32)
    mask = np.zeros(canvas.shape, dtype=np.uint8)
    for poly, i in zip(pts, index, strict=True):
        cv2.fillPoly(canvas, [poly], float(nuc.value[i]), cv2.LINE_8, _SHIFT)
        cv2.fillPoly(mask, [poly], 255, cv2.LINE_8, _SHIFT)
    if rim is not None:
        for poly, i in zip(pts, index, strict=True):
            if rim[i] > 0:
                value = float(nuc.value[i] + rim[i])
                cv2.polylines(canvas, [poly], True, value, 1, cv2.LINE_8, _SHIFT)
    return mask


# --------------------------------------------------------------------------------------------
# Tissue types
# --------------------------------------------------------------------------------------------


def _px(um: float, mpp: float) -> float:
    return um / mpp


def _warp(img: np.ndarray, dx: np.ndarray, dy: np.ndarray, interpolation: int) -> np.ndarray:
    """Sample a periodic image at (x + dx, y + dy); periodic fields keep the result periodic."""
    size = img.shape[0]
    pad = math.ceil(max(float(np.abs(dx).max()), float(np.abs(dy).max()))) + 2
    padded = np.pad(img, ((pad, pad), (pad, pad)), mode="wrap")
    grid = np.arange(size, dtype=np.float32) + np.float32(pad)
    map_x = dx + grid[None, :]
    map_y = dy + grid[:, None]
    return cv2.remap(padded, map_x, map_y, interpolation, borderMode=cv2.BORDER_REFLECT)


def _fibres(rng: np.random.Generator, size: int, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Wavy collagen-like bundles in orientation domains; also return the local fibre angle.

    Straight anisotropic noise looks brushed; warping it by a smooth displacement field makes
    the bundles bend and weave the way dense connective tissue does.
    """
    n_dirs = 4
    base = rng.uniform(0, math.pi / n_dirs)
    angles = base + np.arange(n_dirs) * math.pi / n_dirs
    along, across, domain = _px(16.0, mpp), _px(0.8, mpp), _px(40.0, mpp)
    weights = np.stack([_spectral_field(rng, size, domain) for _ in range(n_dirs)])
    weights = np.exp(6.0 * (weights - weights.max(axis=0, keepdims=True)))
    weights /= weights.sum(axis=0, keepdims=True)
    fibre = np.zeros((size, size), dtype=np.float32)
    for w, a in zip(weights, angles, strict=True):
        fibre += w * _spectral_field(rng, size, along, across, float(a))
    fibre /= np.sqrt((weights**2).sum(axis=0))
    local_angle = angles[np.argmax(weights, axis=0)].astype(np.float32)
    amplitude = _px(7.0, mpp)
    dx = amplitude * _spectral_field(rng, size, _px(18.0, mpp))
    dy = amplitude * _spectral_field(rng, size, _px(18.0, mpp))
    fibre = _warp(fibre, dx, dy, cv2.INTER_LINEAR)
    local_angle = _warp(local_angle, dx, dy, cv2.INTER_NEAREST)
    return fibre, local_angle


def _stroma(
    rng: np.random.Generator, size: int, mpp: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fibrous stroma without nuclei: (haematoxylin, eosin, lumen, local fibre angle).

    Shared by normal tissue and the low-grade tumour component, which infiltrates the same
    stroma: what tells the two apart is then the cells, not the background.
    """
    fibre, local_angle = _fibres(rng, size, mpp)
    density = _spectral_field(rng, size, _px(60.0, mpp))
    spaces = _spectral_field(rng, size, _px(14.0, mpp))

    eosin = 0.46 + 0.15 * fibre + 0.07 * density
    cleft = 1.0 / (1.0 + np.exp(-4.0 * (-fibre - 1.3)))  # pale gaps between fibre bundles
    eosin *= 1.0 - 0.7 * cleft
    haem = 0.05 + 0.015 * fibre

    # Occasional vessels / fat: clear spaces with a thin dense eosinophilic wall.
    lumen = np.clip((spaces - 2.3) * 4.0, 0.0, 1.0)
    wall = np.clip(1.0 - np.abs(spaces - 2.1) * 6.0, 0.0, 1.0)
    eosin = eosin * (1.0 - 0.93 * lumen) + 0.25 * wall
    haem = haem * (1.0 - 0.9 * lumen)
    return haem, eosin, lumen, local_angle


def _normal_texture(rng: np.random.Generator, size: int, mpp: float) -> np.ndarray:
    """Pink fibrous stroma with sparse fibroblast and lymphocyte nuclei, a few vessels."""
    haem, eosin, lumen, local_angle = _stroma(rng, size, mpp)

    area_um2 = (size * mpp) ** 2
    n = rng.poisson(area_um2 / 650.0)
    centers = rng.uniform(0, size, (n, 2))
    cx, cy = centers[:, 0].astype(int) % size, centers[:, 1].astype(int) % size
    inside = lumen[cy, cx] < 0.2
    centers, cx, cy = centers[inside], cx[inside], cy[inside]
    n = len(centers)
    lymph = rng.random(n) < 0.35
    major = np.where(lymph, rng.uniform(2.6, 3.4, n), rng.uniform(4.5, 7.5, n)) / mpp
    minor = np.where(lymph, major * rng.uniform(0.85, 1.0, n), rng.uniform(1.1, 1.7, n) / mpp)
    angle = np.where(lymph, rng.uniform(0, math.pi, n), local_angle[cy, cx])
    value = np.where(lymph, rng.uniform(1.5, 1.9, n), rng.uniform(0.9, 1.3, n))
    nuclei = np.zeros((size, size), dtype=np.float32)
    nuc_mask = _draw_nuclei(nuclei, _Nuclei(centers, major, minor, angle, 0.08, value), rng)
    chromatin = _spectral_field(rng, size, _px(0.5, mpp))
    inside_nuc = nuc_mask > 0
    haem = np.where(inside_nuc, nuclei * (1.0 + 0.15 * chromatin), haem)
    eosin = np.where(inside_nuc, eosin * 0.45, eosin)
    return _finish(haem, eosin, mpp)


def _tumour_texture(rng: np.random.Generator, size: int, mpp: float) -> np.ndarray:
    """Sheets of crowded, enlarged, hyperchromatic, pleomorphic nuclei in nests.

    Amphophilic (purplish) cytoplasm, fibrous septa between nests, a few clear spaces,
    vesicular nuclei with dark membranes and prominent nucleoli: the features a pathologist
    (and an ImageNet CNN, via texture and colour) uses to tell carcinoma from stroma.
    """
    septa_field = _spectral_field(rng, size, _px(45.0, mpp))
    septa_fibre = _spectral_field(rng, size, _px(3.0, mpp))
    spaces = _spectral_field(rng, size, _px(10.0, mpp))
    cyto = _spectral_field(rng, size, _px(2.0, mpp))
    septa = np.clip(1.6 - np.abs(septa_field) / 0.09, 0.0, 1.0)
    lumen = np.clip((spaces - 2.4) * 4.0, 0.0, 1.0)

    eosin = 0.29 + 0.05 * cyto + septa * (0.22 + 0.1 * septa_fibre)
    haem = 0.2 + 0.04 * cyto - 0.12 * septa
    eosin *= 1.0 - 0.9 * lumen
    haem *= 1.0 - 0.9 * lumen

    spacing = _px(13.0, mpp)
    rows = max(2, round(size / (spacing * math.sqrt(3) / 2)))
    cols = max(2, round(size / spacing))
    gy, gx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    gx = (gx + 0.5 * (gy % 2)) * size / cols
    gy = gy * size / rows
    centers = np.stack([gx.ravel(), gy.ravel()], axis=1)
    centers += rng.normal(0, 0.22 * spacing, centers.shape)
    centers %= size
    cx, cy = centers[:, 0].astype(int) % size, centers[:, 1].astype(int) % size
    keep = (septa[cy, cx] < 0.2) & (lumen[cy, cx] < 0.2) & (rng.random(len(centers)) > 0.1)
    centers = centers[keep]
    n = len(centers)
    major = rng.uniform(4.5, 7.5, n) / mpp
    minor = major / rng.uniform(1.0, 1.6, n)
    angle = rng.uniform(0, math.pi, n)
    vesicular = rng.random(n) < 0.55
    value = np.where(vesicular, rng.uniform(0.6, 0.9, n), rng.uniform(1.2, 1.75, n))
    rim = np.where(vesicular, rng.uniform(0.5, 0.8, n), 0.0)
    nuclei = np.zeros((size, size), dtype=np.float32)
    nuc_mask = _draw_nuclei(nuclei, _Nuclei(centers, major, minor, angle, 0.2, value), rng, rim)
    # Prominent nucleoli in the vesicular nuclei.
    n_ves = int(vesicular.sum())
    jitter = rng.normal(0, 0.25, (n_ves, 2)) * minor[vesicular, None]
    radius = rng.uniform(0.7, 1.1, n_ves) / mpp
    nucleoli = np.zeros((size, size), dtype=np.float32)
    _draw_nuclei(
        nucleoli,
        _Nuclei(centers[vesicular] + jitter, radius, radius, np.zeros(n_ves), 0.0, np.ones(n_ves)),
        rng,
    )
    chromatin = _spectral_field(rng, size, _px(0.7, mpp))
    inside_nuc = nuc_mask > 0
    haem = np.where(inside_nuc, nuclei * (1.0 + 0.3 * chromatin), haem) + 0.9 * nucleoli
    eosin = np.where(inside_nuc, eosin * 0.5, eosin) + 0.15 * nucleoli
    return _finish(haem, eosin, mpp)


def _cord_texture(
    rng: np.random.Generator,
    size: int,
    mpp: float,
    *,
    nucleus_um: tuple[float, float],
    nucleus_h: tuple[float, float],
    rim: tuple[float, float] | None,
) -> np.ndarray:
    """Cords and small tubules of epithelium through fibrous stroma, with the given nuclei.

    One function for the low-grade carcinoma and its benign mimic, so the two share every
    architectural feature (the same stroma, cords, lumens, cytoplasm and cell density) and
    differ only in the nuclei: semi-major axis ``nucleus_um`` (µm) and haematoxylin
    ``nucleus_h``, both drawn uniformly per nucleus, and a vesicular rim of ``rim`` extra
    haematoxylin (None: solid nuclei). The architecture constants are read at call time.
    """
    haem, eosin, stroma_lumen, _ = _stroma(rng, size, mpp)
    tubules = _spectral_field(rng, size, _px(LOW_GRADE_CORD_UM, mpp))
    cyto = _spectral_field(rng, size, _px(2.0, mpp))
    # Cords: bands around level sets of a smooth field; small lumens where it peaks.
    phase = np.abs(np.mod(tubules * LOW_GRADE_CORD_FREQ, 1.0) - 0.5) * 2.0
    band = np.clip((LOW_GRADE_CORD_WIDTH - phase) / 0.08, 0.0, 1.0) * (stroma_lumen < 0.1)
    lumen = np.clip((tubules - 1.6) * 5.0, 0.0, 1.0)
    cell_eosin = LOW_GRADE_CELL_EOSIN + 0.03 * cyto
    eosin = eosin + band * (cell_eosin - eosin)
    haem = haem + band * (LOW_GRADE_CELL_HAEM - haem)
    eosin *= 1.0 - 0.9 * lumen
    haem *= 1.0 - 0.9 * lumen

    area_um2 = (size * mpp) ** 2
    n = rng.poisson(area_um2 / LOW_GRADE_CELL_AREA_UM2)
    centers = rng.uniform(0, size, (n, 2))
    cx, cy = centers[:, 0].astype(int) % size, centers[:, 1].astype(int) % size
    keep = (rng.random(n) < band[cy, cx]) & (lumen[cy, cx] < 0.1)
    centers = centers[keep]
    n = len(centers)
    major = rng.uniform(*nucleus_um, n) / mpp
    minor = major / rng.uniform(1.0, 1.25, n)
    angle = rng.uniform(0, math.pi, n)
    value = rng.uniform(*nucleus_h, n)
    rims = None if rim is None else rng.uniform(*rim, n)
    nuclei = np.zeros((size, size), dtype=np.float32)
    nuc_mask = _draw_nuclei(nuclei, _Nuclei(centers, major, minor, angle, 0.06, value), rng, rims)
    chromatin = _spectral_field(rng, size, _px(0.6, mpp))
    inside_nuc = nuc_mask > 0
    haem = np.where(inside_nuc, nuclei * (1.0 + 0.1 * chromatin), haem)
    eosin = np.where(inside_nuc, eosin * 0.55, eosin)
    return _finish(haem, eosin, mpp)


def _low_grade_texture(rng: np.random.Generator, size: int, mpp: float) -> np.ndarray:
    """Well-differentiated (low-grade) carcinoma: cords and small tubules in fibrous stroma.

    The subtle component of a heterogeneous tumour. Its cells are not a fainter copy of the
    high-grade sheets (which weak supervision finds by their crowded, hyperchromatic, purple
    nuclei) but a different picture: orderly rows of barely enlarged, round, pale vesicular
    nuclei with fine chromatin and no nucleoli, in cytoplasm as pink as the stroma, running
    in cords and around small lumens through the same fibrous stroma as normal tissue. Overall
    it stays pink and sparse like stroma, so a detector of the high-grade pattern scores it as
    normal, while the beaded rows of round nuclei still tell it apart.
    """
    return _cord_texture(
        rng,
        size,
        mpp,
        nucleus_um=LOW_GRADE_NUCLEUS_UM,
        nucleus_h=LOW_GRADE_NUCLEUS_H,
        rim=LOW_GRADE_NUCLEUS_RIM,
    )


def _mimic_texture(rng: np.random.Generator, size: int, mpp: float) -> np.ndarray:
    """Benign mimic of low-grade carcinoma (benign tubules, sclerosing adenosis) in normal tissue.

    The low-grade texture's cords and tubules in the same stroma, lined by benign cells:
    small, dark, uniform nuclei without a vesicular rim (``MIMIC_*``). A slide label says
    nothing about which cords are which, a patch label does.
    """
    return _cord_texture(
        rng,
        size,
        mpp,
        nucleus_um=MIMIC_NUCLEUS_UM,
        nucleus_h=MIMIC_NUCLEUS_H,
        rim=MIMIC_NUCLEUS_RIM,
    )


_Texture = Callable[[np.random.Generator, int, float], np.ndarray]
"""A tissue type: (rng, bank side px, µm/px) → periodic (c_H, c_E) bank."""


def _finish(haem: np.ndarray, eosin: np.ndarray, mpp: float) -> np.ndarray:
    """Clip to physical (non-negative) concentrations and add the scanner's optical blur."""
    conc = np.stack([np.clip(haem, 0, None), np.clip(eosin, 0, None)], axis=-1)
    return _wrap_blur(conc.astype(np.float32), _px(0.3, mpp))


def _bank(conc: np.ndarray) -> TextureBank:
    size = conc.shape[0]
    padded = np.pad(conc, ((0, TILE), (0, TILE), (0, 0)), mode="wrap")
    mean = conc.reshape(-1, 2).mean(axis=0).astype(np.float32)
    return TextureBank(size=size, data=np.ascontiguousarray(padded, dtype=np.float32), mean=mean)


def build_banks(
    size: int,
    mpp: float,
    seed: np.random.SeedSequence,
    *,
    low_grade: bool = False,
    mimic: bool = False,
) -> TextureBanks:
    """Draw the normal and tumour banks of one slide (deterministic in ``seed``).

    ``low_grade`` adds the subtle tumour component's bank from a third child of ``seed``,
    ``mimic`` the benign mimic's from a fourth; spawned children do not depend on how many are
    spawned, so every other bank stays the same bytes with or without them.
    """
    if size % TILE:
        raise ConfigError(f"bank size {size} must be a multiple of {TILE}")
    children = seed.spawn(4 if mimic else 3 if low_grade else 2)

    def extra(wanted: bool, child: int, texture: _Texture) -> TextureBank | None:
        if not wanted:
            return None
        return _bank(texture(np.random.default_rng(children[child]), size, mpp))

    return TextureBanks(
        normal=_bank(_normal_texture(np.random.default_rng(children[0]), size, mpp)),
        tumour=_bank(_tumour_texture(np.random.default_rng(children[1]), size, mpp)),
        low_grade=extra(low_grade, 2, _low_grade_texture),
        mimic=extra(mimic, 3, _mimic_texture),
    )


# --------------------------------------------------------------------------------------------
# Mapping slide tiles onto banks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BankView:
    """Where one super-tile of the slide samples a bank: offset plus a dihedral transform.

    Super-tile pixel p = (x, y) (relative to the super-tile origin) maps to bank pixel
    (A·p + offset) mod size, with A a signed permutation (``swap`` exchanges x and y, the signs
    flip). Because A is a signed permutation, a TILE×TILE window maps to one TILE×TILE window
    of the periodic bank, possibly transposed or mirrored: one slice and a view transform.
    """

    offset_x: int
    offset_y: int
    sign_x: int
    sign_y: int
    swap: bool

    def tile(self, bank: TextureBank, u0: int, v0: int) -> np.ndarray:
        """The TILE×TILE×2 texture of the tile whose top-left is (u0, v0) in the super-tile.

        Returns a new C-contiguous array: OpenCV's flip/transpose are several times faster
        than numpy's strided copies of mirrored 2-channel views, and later arithmetic on a
        contiguous tile is fast too.
        """
        size = bank.size
        # Bank row index is driven by tile column when swapped, by tile row otherwise.
        row_src, col_src = (u0, v0) if self.swap else (v0, u0)
        r0, flip_r = _axis_start(self.sign_y, row_src, self.offset_y, size)
        c0, flip_c = _axis_start(self.sign_x, col_src, self.offset_x, size)
        crop = bank.crop(r0, c0)
        if flip_r or flip_c:
            crop = cv2.flip(crop, -1 if flip_r and flip_c else (0 if flip_r else 1))
        if self.swap:
            return cv2.transpose(crop)
        return crop.copy() if crop.base is not None else crop


def _axis_start(sign: int, g0: int, offset: int, size: int) -> tuple[int, bool]:
    """First bank index of a TILE-long run, and whether the run is read backwards."""
    if sign > 0:
        return (g0 + offset) % size, False
    return (offset - g0 - (TILE - 1)) % size, True


def random_views(rng: np.random.Generator, count: int, size: int) -> list[BankView]:
    """One independent view per super-tile."""
    offsets = rng.integers(0, size, (count, 2))
    signs = rng.choice(np.array([-1, 1]), (count, 2))
    swaps = rng.random(count) < 0.5
    return [
        BankView(int(o[0]), int(o[1]), int(s[0]), int(s[1]), bool(w))
        for o, s, w in zip(offsets, signs, swaps, strict=True)
    ]
