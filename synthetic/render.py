"""Render one level-0 tile of a synthetic slide from its masks, texture banks and stain.

A tile's pixels depend only on the scene and the tile's position, never on which thread or in
which order tiles are rendered: that is what makes the slide byte-identical across runs while
tiles are produced in parallel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from fedpath.common.errors import ConfigError
from fedpath.synthetic.stain import StainConfig, concentrations_to_rgb, stain_matrix
from fedpath.synthetic.texture import TILE, BankView, TextureBank, TextureBanks, random_views

TUMOUR_EDGE_PX = 4.0
"""Width (level-0 px) of the blend between normal and tumour texture at the tumour border."""
TUMOUR_NEST_SHARPNESS = 10.0
"""Slope of the tumour weight across a nest edge of the infiltrating-tumour field: the weight
goes from 0 to 1 over 1/10 of the field's range, a few level-0 px."""
TISSUE_EDGE_PX = 3.0
"""Width (level-0 px) of the fade from tissue to glass."""
EDGE_RAGGEDNESS = 1.5
"""How far (in mask units per eosin unit) the tissue edge follows the texture: ragged edges."""
SEAM_BLEND_PX = 48
"""Width (level-0 px) of the cross-fade between neighbouring super-tiles' texture views."""


def _ramp_weights(start: int, size: int, count: int) -> list[tuple[int, np.ndarray]]:
    """Partition-of-unity weights along one axis for the pixels [start, start + TILE).

    Super-tile c owns [c·size, (c+1)·size); its weight ramps linearly over SEAM_BLEND_PX
    centred on each border, so weights of neighbours always sum to one. Returned as
    (super-tile index, TILE weights) for the super-tiles that contribute; index −1 and
    ``count`` are the ring of extra views beyond the slide edge.
    """
    half = SEAM_BLEND_PX / 2
    x = np.arange(start, start + TILE, dtype=np.float32) + np.float32(0.5)
    first = (start - SEAM_BLEND_PX) // size
    last = (start + TILE + SEAM_BLEND_PX) // size
    out = []
    for c in range(max(first, -1), min(last, count) + 1):
        rise = np.clip((x - (c * size - half)) / SEAM_BLEND_PX, 0.0, 1.0)
        fall = np.clip(((c + 1) * size + half - x) / SEAM_BLEND_PX, 0.0, 1.0)
        w = np.minimum(rise, fall)
        if w.any():
            out.append((c, w))
    return out


@dataclass(frozen=True)
class SlideScene:
    """Everything that determines a slide's pixels.

    ``fields`` is (rows·n + 2, cols·n + 2, 3) float32 at mask resolution, n = TILE/downsample:
    tissue (0/1), tumour (0/1) and thickness, with one pixel of border so that each tile's
    bilinear upsampling sees its neighbours and tiles join without seams. ``views`` holds one
    bank view per super-tile (bank-sized squares of the slide) plus a ring around the slide,
    row-major over (super_rows + 2) × (super_cols + 2).
    """

    width: int
    height: int
    downsample: int
    fields: np.ndarray
    banks: TextureBanks
    views: tuple[BankView, ...]
    super_rows: int
    super_cols: int
    matrix: np.ndarray
    background: tuple[int, int, int]
    density: np.ndarray | None = None
    """Padded like ``fields`` (rows·n + 2, cols·n + 2): the infiltrating-tumour nest field
    (tumour texture where it is positive, see ``synthetic.tumour_density``). None: solid."""
    low_grade: np.ndarray | None = None
    """Padded like ``fields``: 0/1 where the tumour has the subtle low-grade morphology
    (``banks.low_grade``) instead of the high-grade one. None: high-grade throughout."""
    mimic: np.ndarray | None = None
    """Padded like ``fields``: 0/1 where the normal tissue shows the benign mimic of low-grade
    tumour (``banks.mimic``); never inside the tumour. None: plain normal tissue."""

    def _view(self, col: int, row: int) -> BankView:
        return self.views[(row + 1) * (self.super_cols + 2) + col + 1]

    def texture(self, bank: TextureBank, x0: int, y0: int) -> np.ndarray:
        """TILE×TILE×2 concentrations of ``bank`` for the tile at level-0 (x0, y0).

        Inside a super-tile this is one crop. Near a super-tile border the neighbours' crops
        are cross-faded with the variance-preserving blend of Heitz & Neyret (mean +
        Σ wᵢ(Tᵢ − mean) / √Σ wᵢ²), so nuclei fade to ~70 % instead of 50 % and the blend
        band does not read as a pale, washed-out stripe.
        """
        size = bank.size
        wx = _ramp_weights(x0, size, self.super_cols)
        wy = _ramp_weights(y0, size, self.super_rows)
        if len(wx) == 1 and len(wy) == 1:
            c, r = wx[0][0], wy[0][0]
            return self._view(c, r).tile(bank, x0 - c * size, y0 - r * size)
        # Work on (TILE, 2·TILE) views: numpy broadcasting over a trailing axis of length 2
        # is ~15× slower than over a long row. The weights are separable and sum to one, so
        # Σ wᵢ(Tᵢ − mean) = Σ wᵢTᵢ − mean and Σ wᵢ² is an outer product of 1-D sums.
        mean = np.tile(bank.mean, TILE)
        sum_x = np.repeat(sum(w * w for _, w in wx), 2)
        sum_y = sum(w * w for _, w in wy)
        inv = 1.0 / np.sqrt(sum_y[:, None] * sum_x[None, :])
        acc = np.zeros((TILE, 2 * TILE), dtype=np.float32)
        for r, w_row in wy:
            for c, w_col in wx:
                w = w_row[:, None] * np.repeat(w_col, 2)[None, :]
                crop = self._view(c, r).tile(bank, x0 - c * size, y0 - r * size)
                cv2.accumulateProduct(crop.reshape(TILE, 2 * TILE), w, acc)
        acc -= mean
        acc *= inv
        acc += mean
        return np.maximum(acc, 0.0, out=acc).reshape(TILE, TILE, 2)

    def _upsampled(self, field: np.ndarray, tx: int, ty: int) -> np.ndarray:
        """A padded mask-resolution field at level 0 over tile (tx, ty): bilinear over the
        tile plus one mask px of border, so neighbouring tiles join without seams."""
        ds = self.downsample
        n = TILE // ds
        sub = field[ty * n : ty * n + n + 2, tx * n : tx * n + n + 2]
        up = cv2.resize(sub, ((n + 2) * ds, (n + 2) * ds), interpolation=cv2.INTER_LINEAR)
        return up[ds : ds + TILE, ds : ds + TILE]

    def _density_tile(self, tx: int, ty: int) -> np.ndarray:
        """TILE×TILE tumour weight in [0, 1] at level 0: the nest field upsampled like the
        masks (no tile seams), then a sharp edge."""
        assert self.density is not None
        return np.clip(self._upsampled(self.density, tx, ty) * TUMOUR_NEST_SHARPNESS, 0.0, 1.0)

    def _blend_toward(
        self,
        conc: np.ndarray,
        mask: np.ndarray | None,
        bank: TextureBank | None,
        tx: int,
        ty: int,
    ) -> np.ndarray:
        """``conc`` (a tile's concentrations, changed in place) blended toward ``bank`` where
        the padded 0/1 ``mask`` says so, with the same edge blend as the tumour border.

        A tile the mask does not reach is returned untouched, without drawing ``bank``: a
        slide without the option keeps its bytes and its speed.
        """
        if mask is None or bank is None:
            return conc
        ds = self.downsample
        n = TILE // ds
        if not mask[ty * n : ty * n + n + 2, tx * n : tx * n + n + 2].any():
            return conc
        up = self._upsampled(mask, tx, ty)
        weight = np.clip((up - 0.5) * (ds / TUMOUR_EDGE_PX) + 0.5, 0.0, 1.0)
        other = self.texture(bank, tx * TILE, ty * TILE)
        conc += _two_channel(weight) * (other - conc)
        return conc

    def _tumour_texture(self, tx: int, ty: int) -> np.ndarray:
        """TILE×TILE×2 tumour concentrations: high-grade, or low-grade where the low-grade
        mask says so."""
        tumour = self.texture(self.banks.tumour, tx * TILE, ty * TILE)
        return self._blend_toward(tumour, self.low_grade, self.banks.low_grade, tx, ty)

    def render_tile(self, tx: int, ty: int) -> np.ndarray | None:
        """TILE×TILE×3 uint8 RGB of tile (tx, ty); None when it is empty glass."""
        ds = self.downsample
        n = TILE // ds
        sub = self.fields[ty * n : ty * n + n + 2, tx * n : tx * n + n + 2]
        if not sub[..., 0].any():
            return None
        up = cv2.resize(sub, ((n + 2) * ds, (n + 2) * ds), interpolation=cv2.INTER_LINEAR)
        up = up[ds : ds + TILE, ds : ds + TILE]
        x0, y0 = tx * TILE, ty * TILE
        conc = self.texture(self.banks.normal, x0, y0)
        # The mimic replaces normal tissue only; the tumour blend below then covers it exactly
        # as it covers plain normal tissue, so tumour pixels do not change.
        conc = self._blend_toward(conc, self.mimic, self.banks.mimic, tx, ty)
        if sub[..., 1].any():
            tumour = self._tumour_texture(tx, ty)
            alpha = np.clip((up[..., 1] - 0.5) * (ds / TUMOUR_EDGE_PX) + 0.5, 0.0, 1.0)
            if self.density is not None:
                alpha *= self._density_tile(tx, ty)
            conc += _two_channel(alpha) * (tumour - conc)
        tissue = up[..., 0] - 0.5 + EDGE_RAGGEDNESS * (conc[..., 1] - 0.4) / ds
        alpha = np.clip(tissue * (ds / TISSUE_EDGE_PX) + 0.5, 0.0, 1.0)
        conc *= _two_channel(alpha * up[..., 2])
        return concentrations_to_rgb(conc, self.matrix, self.background)


def _two_channel(plane: np.ndarray) -> np.ndarray:
    """H×W → H×W×2 copy, for fast same-shape arithmetic with (c_H, c_E) tiles."""
    plane = np.ascontiguousarray(plane, dtype=np.float32)
    return cv2.merge([plane, plane])


def build_scene(
    *,
    width: int,
    height: int,
    downsample: int,
    tissue: np.ndarray,
    tumour: np.ndarray,
    thickness: np.ndarray,
    banks: TextureBanks,
    stain: StainConfig,
    rng: np.random.Generator,
    density: np.ndarray | None = None,
    low_grade: np.ndarray | None = None,
    mimic: np.ndarray | None = None,
) -> SlideScene:
    """Assemble the padded mask fields and draw one bank view per super-tile.

    ``density`` (mask resolution, like ``tumour``) is the infiltrating-tumour nest field; None
    keeps solid tumour everywhere and the scene exactly as without the option. ``low_grade``
    (same grid, 0/1, within ``tumour``) marks the subtle component; it needs
    ``banks.low_grade``. None keeps every tumour pixel high-grade. ``mimic`` (same grid, 0/1,
    outside ``tumour``) marks the benign mimic in normal tissue; it needs ``banks.mimic``.
    """
    if low_grade is not None and banks.low_grade is None:
        raise ConfigError("a low-grade tumour mask needs a low-grade texture bank")
    if mimic is not None and banks.mimic is None:
        raise ConfigError("a mimic mask needs a mimic texture bank")
    if TILE % downsample:
        raise ConfigError(f"mask downsample {downsample} must divide the tile size {TILE}")
    n = TILE // downsample
    rows, cols = math.ceil(height / TILE), math.ceil(width / TILE)
    fields = np.zeros((rows * n + 2, cols * n + 2, 3), dtype=np.float32)
    h, w = tissue.shape
    fields[1 : 1 + h, 1 : 1 + w, 0] = tissue
    fields[1 : 1 + h, 1 : 1 + w, 1] = tumour
    pad = ((1, rows * n + 1 - h), (1, cols * n + 1 - w))
    thick = np.pad(thickness, pad, mode="edge")
    fields[..., 2] = thick
    padded_density, padded_low_grade, padded_mimic = (
        None if m is None else np.pad(m.astype(np.float32), pad, mode="edge")
        for m in (density, low_grade, mimic)
    )
    size = banks.normal.size
    super_rows, super_cols = math.ceil(height / size), math.ceil(width / size)
    views = tuple(random_views(rng, (super_rows + 2) * (super_cols + 2), size))
    return SlideScene(
        width=width,
        height=height,
        downsample=downsample,
        fields=fields,
        banks=banks,
        views=views,
        super_rows=super_rows,
        super_cols=super_cols,
        matrix=stain_matrix(stain),
        background=stain.background_rgb,
        density=padded_density,
        low_grade=padded_low_grade,
        mimic=padded_mimic,
    )
