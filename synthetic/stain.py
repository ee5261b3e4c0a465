"""Stain model of the synthetic slides: H and E concentrations → RGB by Beer-Lambert.

Rendering concentrations rather than colours is what makes the per-site stain shift realistic:
a site with stronger haematoxylin, a bluer eosin or a yellowish light source changes every
pixel the way a real protocol or scanner would (multiplicatively in optical density), so
colour normalisation methods and encoders see the same kind of shift they meet in practice.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from pydantic import Field

from fedpath.common.configbase import StrictModel

REFERENCE_H: tuple[float, float, float] = (0.5626, 0.7201, 0.4062)
REFERENCE_E: tuple[float, float, float] = (0.2159, 0.8012, 0.5581)
"""Optical-density directions (R, G, B) of haematoxylin and eosin.

Ruifrok-style unit OD vectors; these are the reference values Macenko normalisation
(staintools, torchstain) uses, which look closer to scanned H&E than Ruifrok's original
eosin (0.07, 0.99, 0.11), whose magenta is rarely seen on real scanners."""

_GREY_AXIS = np.full(3, 1.0 / math.sqrt(3.0))


class StainConfig(StrictModel):
    """How one site stains and scans: stain directions, strengths and the light source."""

    h_vector: tuple[float, float, float] = Field(
        REFERENCE_H, description="haematoxylin OD direction (R, G, B) before perturbation"
    )
    e_vector: tuple[float, float, float] = Field(
        REFERENCE_E, description="eosin OD direction (R, G, B) before perturbation"
    )
    h_hue_deg: float = Field(
        0.0,
        ge=-45,
        le=45,
        description="rotation of the H vector about the grey axis (hue); negative: bluer",
    )
    e_hue_deg: float = Field(
        0.0,
        ge=-45,
        le=45,
        description="rotation of the E vector about the grey axis (hue); negative: purpler",
    )
    h_tilt_deg: float = Field(
        0.0,
        ge=-30,
        le=30,
        description="rotation of the H vector away from (+) or towards (−) grey (saturation)",
    )
    e_tilt_deg: float = Field(
        0.0,
        ge=-30,
        le=30,
        description="rotation of the E vector away from (+) or towards (−) grey (saturation)",
    )
    h_scale: float = Field(1.0, gt=0, le=3, description="haematoxylin strength (× concentration)")
    e_scale: float = Field(1.0, gt=0, le=3, description="eosin strength (× concentration)")
    background_rgb: tuple[int, int, int] = Field(
        (242, 242, 244),
        description="incident light I0 per channel: the colour of empty glass (tint)",
    )


STAIN_PRESETS: dict[str, StainConfig] = {
    "reference": StainConfig(),
    "purple": StainConfig(
        h_hue_deg=-8.0,
        e_hue_deg=-20.0,
        h_scale=1.3,
        e_scale=1.05,
        background_rgb=(240, 241, 246),
    ),
    "pale": StainConfig(
        h_hue_deg=5.0,
        e_hue_deg=10.0,
        h_scale=0.7,
        e_scale=0.75,
        background_rgb=(246, 244, 239),
    ),
}
"""Named site stain protocols: a reference lab, a haematoxylin-heavy bluish one and a faded
pink one with a warm light source (the three sites of the default cohort). Glass tints stay
below HSV saturation 8 (of 255), the tissue threshold of CLAM-style segmentation, as real
scanners' white balance keeps them; a more saturated tint would make glass read as tissue."""


def resolve_stain(stain: StainConfig | str) -> StainConfig:
    """Accept a preset name wherever a stain is configured."""
    if isinstance(stain, StainConfig):
        return stain
    try:
        return STAIN_PRESETS[stain]
    except KeyError:
        known = ", ".join(sorted(STAIN_PRESETS))
        raise ValueError(f"unknown stain preset {stain!r} (known: {known})") from None


def _rotate(vector: np.ndarray, axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues rotation of ``vector`` about unit ``axis``."""
    theta = math.radians(degrees)
    return (
        vector * math.cos(theta)
        + np.cross(axis, vector) * math.sin(theta)
        + axis * float(np.dot(axis, vector)) * (1.0 - math.cos(theta))
    )


def _perturb(vector: tuple[float, float, float], hue_deg: float, tilt_deg: float) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64)
    v = v / np.linalg.norm(v)
    v = _rotate(v, _GREY_AXIS, hue_deg)
    tilt_axis = np.cross(_GREY_AXIS, v)
    norm = np.linalg.norm(tilt_axis)
    if norm > 1e-9 and tilt_deg != 0.0:
        v = _rotate(v, tilt_axis / norm, tilt_deg)
    # An OD vector with a negative channel would make a stain *add* light: physically meaningless.
    v = np.clip(v, 1e-3, None)
    return v / np.linalg.norm(v)


def stain_matrix(stain: StainConfig) -> np.ndarray:
    """2×3 float32 matrix M with OD = [c_H, c_E] @ M (strengths folded into the rows)."""
    h = _perturb(stain.h_vector, stain.h_hue_deg, stain.h_tilt_deg) * stain.h_scale
    e = _perturb(stain.e_vector, stain.e_hue_deg, stain.e_tilt_deg) * stain.e_scale
    return np.stack([h, e]).astype(np.float32)


def concentrations_to_rgb(
    conc: np.ndarray, matrix: np.ndarray, background_rgb: tuple[int, int, int]
) -> np.ndarray:
    """Beer-Lambert: RGB = I0 · exp(−(c_H·v_H + c_E·v_E)) for an H×W×2 concentration map.

    A BLAS product and OpenCV kernels (which release the GIL, so tiles render in parallel
    threads); numpy broadcasting over the 3-channel axis would be several times slower.
    """
    h, w = conc.shape[:2]
    flat = np.ascontiguousarray(conc, dtype=np.float32).reshape(-1, 2)
    neg_od = (flat @ -matrix.astype(np.float32)).reshape(h, w, 3)
    scale = (*(float(c) for c in background_rgb), 0.0)
    light = cv2.multiply(cv2.exp(neg_od), scale)
    return cv2.convertScaleAbs(light)
