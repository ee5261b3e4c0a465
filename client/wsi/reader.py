"""Open a whole-slide image once, validate it up front, and read RGB regions from it.

Every later stage (tissue mask, patch grid, embedding) trusts what this module returns, so the
checks that turn a bad file into a clear per-slide error happen here, at open time: missing or
empty files, formats OpenSlide cannot decode, truncated files, absurd declared sizes and an
unknown physical resolution. A batch job can then skip that one slide with a readable reason
instead of failing hours later inside a worker thread.

OpenSlide returns RGBA in which areas outside the scanned region are fully transparent
(0, 0, 0, 0). Tissue detection thresholds saturation, and transparent black would be harmless
there, but colour statistics, encoders and thumbnails would all see black borders; compositing
on white makes "no data" look like glass, which is what it physically is.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
import openslide
import tifffile

from fedpath.client.wsi.tile_reader import (
    FAST_VENDORS,
    TileCache,
    TileDecodeError,
    TiledLevelReader,
    find_level_pages,
)
from fedpath.common.errors import MissingMppError, SlideOpenError, SlideReadError

MAX_SIDE_PX = 1_000_000
"""Largest level-0 side accepted; real slides stay below ~250k px, so more means a bad header."""

MPP_X, MPP_Y = "openslide.mpp-x", "openslide.mpp-y"
OBJECTIVE_POWER = "openslide.objective-power"
MICRONS_PER_PX_AT_1X = 10.0
"""Convention used by CLAM/TRIDENT and scanners: 10× ≈ 1 µm/px, so mpp ≈ 10 / power."""

VALIDATION_REGION_PX = 256
VALIDATION_SPOTS = ((0.31, 0.27), (0.52, 0.56), (0.73, 0.81))
"""Where (fractions of the level) the fast tile path is compared with OpenSlide at open time:
spread over the level and deliberately not tile-aligned, so tile seams are exercised."""
MAX_MEAN_ABS_DIFF = 1.0
MAX_ABS_DIFF = 16
"""Agreement required to trust the fast path: JPEG decoders may round differently (IDCT and
chroma upsampling), but anything beyond that means we decode the level differently."""


@dataclass(frozen=True)
class SlideInfo:
    """What the rest of the pipeline needs to know about a slide, resolved once at open."""

    path: Path
    slide_id: str
    vendor: str | None
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float
    mpp_source: str
    objective_power: float | None

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        """µm/px of a pyramid level (level-0 mpp × that level's downsample)."""
        return self.mpp * self.level_downsamples[level]


def _positive_float(value: str | None) -> float | None:
    """Parse a slide property as a positive finite float; anything else counts as absent."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number <= 0:
        return None
    return number


def resolve_mpp(
    properties: Mapping[str, str], override: float | None, slide: str
) -> tuple[float, str]:
    """Level-0 µm/px and where it came from: override, the slide's own MPP, or objective power.

    The override comes first because a hospital sets it precisely when the file's metadata is
    missing or wrong. Anisotropic pixels (mpp-x ≠ mpp-y) are averaged: patches are square and
    the difference on real scanners is below a percent.
    """
    if override is not None:
        value = _positive_float(str(override))
        if value is None:
            raise MissingMppError(
                slide, f"mpp override must be a positive number, got {override!r}"
            )
        return value, "override"
    mpp_values = [v for v in (_positive_float(properties.get(k)) for k in (MPP_X, MPP_Y)) if v]
    if mpp_values:
        return float(sum(mpp_values) / len(mpp_values)), "slide"
    power = _positive_float(properties.get(OBJECTIVE_POWER))
    if power is not None:
        return MICRONS_PER_PX_AT_1X / power, "objective_power"
    raise MissingMppError(
        slide,
        "the slide declares neither microns-per-pixel (openslide.mpp-x/mpp-y) nor an objective "
        "power; give an mpp override for it in the manifest",
    )


_TIFF_MAGIC = {
    b"II*\x00": ("<", False),
    b"MM\x00*": (">", False),
    b"II+\x00": ("<", True),
    b"MM\x00+": (">", True),
}
"""Byte order and BigTIFF-ness by the first four bytes of a TIFF."""


def tiff_truncation(path: Path) -> str | None:
    """Say so when a file that starts like a TIFF (SVS, generic TIFF) is cut short, else None.

    OpenSlide reports a cut-short TIFF as "unsupported or missing image file" or a short read,
    which sends an admin looking for a format problem; the usual cause is an interrupted copy,
    and the fix is to copy the file again. Only called after OpenSlide has refused the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return None
    if head[:4] not in _TIFF_MAGIC or len(head) < 16:
        return None
    order, big = _TIFF_MAGIC[head[:4]]
    first_ifd = struct.unpack_from(order + ("Q" if big else "I"), head, 8 if big else 4)[0]
    if first_ifd >= size:
        end = first_ifd
    else:
        end = 0
        tiff_log = logging.getLogger("tifffile")
        level = tiff_log.level
        tiff_log.setLevel(logging.CRITICAL)  # it logs the broken page chain we are diagnosing
        try:
            with tifffile.TiffFile(path) as tif:
                for page in tif.pages:  # stops at the first directory past the end
                    for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False):
                        end = max(end, offset + count)
        except Exception:  # not parseable even as far as the header: say nothing
            return None
        finally:
            tiff_log.setLevel(level)
    if end <= size:
        return None
    return (
        f"{path} is truncated: its TIFF structure refers to byte {end:,} but the file has only "
        f"{size:,} bytes (an interrupted copy? copy the slide again)"
    )


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha-blend an RGBA uint8 array onto white (OpenSlide's alpha is not premultiplied)."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        # cv2 drops the alpha channel ~40x faster than a numpy contiguous copy of the view;
        # this runs once per patch in the embedding hot path.
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    rgb = rgba[..., :3]
    a = alpha.astype(np.uint16)[..., None]
    blended = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return blended.astype(np.uint8)


class WsiReader:
    """A validated OpenSlide handle; usable from several threads at once for read_region.

    With ``fast_tiles`` (the default) levels stored as plain tiled TIFF pages (Aperio SVS,
    generic pyramidal TIFF) are read by decoding their tiles directly (``TiledLevelReader``),
    ~4× cheaper per patch than OpenSlide's painter. Each such level is checked against OpenSlide
    at open time and only used if the pixels agree; ``fast_levels`` says which levels passed.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        slide_id: str | None = None,
        mpp_override: float | None = None,
        fast_tiles: bool = True,
    ) -> None:
        self.path = Path(path)
        sid = slide_id if slide_id is not None else self.path.stem
        self._slide: openslide.OpenSlide | None = None
        self._fd: int | None = None
        self._fast: dict[int, TiledLevelReader] = {}
        self._candidates: dict[int, TiledLevelReader] = {}
        self._validation_lock = threading.Lock()
        self._check_file(sid)
        try:
            slide = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            truncated = tiff_truncation(self.path)
            if truncated is not None:
                raise SlideOpenError(sid, truncated) from exc
            if isinstance(exc, openslide.OpenSlideUnsupportedFormatError):
                raise SlideOpenError(
                    sid, f"{self.path} is not a slide format OpenSlide can read ({exc})"
                ) from exc
            raise SlideOpenError(
                sid, f"OpenSlide cannot open {self.path}: {exc} (corrupt, truncated or unsupported)"
            ) from exc
        self._slide = slide
        try:
            self.info = self._describe(slide, sid, mpp_override)
            self._probe(sid)
            if fast_tiles:
                self._setup_fast_tiles()
        except BaseException:
            self.close()
            raise

    def _check_file(self, sid: str) -> None:
        if not self.path.exists():
            raise SlideOpenError(sid, f"file not found: {self.path}")
        if not self.path.is_file():
            raise SlideOpenError(sid, f"not a regular file: {self.path}")
        if self.path.stat().st_size == 0:
            raise SlideOpenError(sid, f"file is empty (0 bytes): {self.path}")

    def _describe(
        self, slide: openslide.OpenSlide, sid: str, mpp_override: float | None
    ) -> SlideInfo:
        try:
            dims = tuple((int(w), int(h)) for w, h in slide.level_dimensions)
            downsamples = tuple(float(d) for d in slide.level_downsamples)
            properties = dict(slide.properties)
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideOpenError(sid, f"cannot read the pyramid of {self.path}: {exc}") from exc
        if not dims:
            raise SlideOpenError(sid, f"{self.path} has no pyramid levels")
        width, height = dims[0]
        if not (0 < width <= MAX_SIDE_PX and 0 < height <= MAX_SIDE_PX):
            raise SlideOpenError(
                sid,
                f"declared size {width}x{height} px is outside 1..{MAX_SIDE_PX} px per side "
                "(corrupt header?)",
            )
        if any(w <= 0 or h <= 0 for w, h in dims) or any(
            not math.isfinite(d) or d <= 0 for d in downsamples
        ):
            raise SlideOpenError(sid, f"{self.path} declares an empty or invalid pyramid level")
        mpp, source = resolve_mpp(properties, mpp_override, sid)
        return SlideInfo(
            path=self.path,
            slide_id=sid,
            vendor=properties.get("openslide.vendor"),
            dimensions=(width, height),
            level_dimensions=dims,
            level_downsamples=downsamples,
            mpp=mpp,
            mpp_source=source,
            objective_power=_positive_float(properties.get(OBJECTIVE_POWER)),
        )

    def _probe(self, sid: str) -> None:
        """Decode the last tile of the finest and coarsest level: truncation shows up there."""
        for level in {0, self.info.level_count - 1}:
            w, h = self.info.level_dimensions[level]
            ds = self.info.level_downsamples[level]
            location = (int((w - 1) * ds), int((h - 1) * ds))
            try:
                self.read_region(location, level, (1, 1))
            except SlideReadError as exc:
                raise SlideOpenError(
                    sid, f"{self.path} opens but its image data cannot be decoded: {exc.reason}"
                ) from exc

    def _setup_fast_tiles(self) -> None:
        """Match levels to tiled TIFF pages: candidates, validated on first use per level.

        Never fails the open: any problem (not a TIFF, unsupported layout, a corrupt tile hit by
        validation, disagreement) just leaves that level to OpenSlide, whose probe has already
        decided whether the slide is readable at all.
        """
        if self.info.vendor not in FAST_VENDORS:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return
        self._fd = fd  # from here on close() releases it, whatever goes wrong
        candidates: dict[int, TiledLevelReader] = {}
        cache = TileCache()
        try:
            with tifffile.TiffFile(self.path) as tif:
                pages = find_level_pages(tif, self.info.level_dimensions)
                for level, page in pages.items():
                    if not float(self.info.level_downsamples[level]).is_integer():
                        # Every read would land between pixels (see level_origin).
                        continue
                    try:
                        candidates[level] = TiledLevelReader(
                            fd, page, level, self.info.level_downsamples[level], cache
                        )
                    except Exception:  # odd page: OpenSlide serves the level
                        continue
        except Exception:  # tifffile cannot parse it: OpenSlide only
            candidates = {}
        if candidates:
            self._candidates = candidates
        else:
            self._fd = None
            os.close(fd)

    def _fast_reader(self, level: int) -> TiledLevelReader | None:
        """The validated fast reader of ``level``, validating it on first use.

        Validation is lazy because it costs a few OpenSlide reads per level: tissue
        segmentation touches one coarse level and embedding one fine level, so validating the
        whole pyramid at open time would more than double the cost of opening a slide.
        """
        if level in self._fast:
            return self._fast[level]
        if level not in self._candidates:
            return None
        with self._validation_lock:
            if level in self._candidates:  # not validated by another thread meanwhile
                candidate = self._candidates.pop(level)
                if self._validate(level, candidate):
                    self._fast[level] = candidate
        return self._fast.get(level)

    def _validate(self, level: int, candidate: TiledLevelReader) -> bool:
        # A separate handle: OpenSlide errors are sticky (one bad tile and every later read
        # of that handle fails), and validation must not poison the handle we keep.
        try:
            reference = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError, ValueError):
            return False
        try:
            return self._agrees(reference, level, candidate)
        finally:
            reference.close()

    def _agrees(
        self, reference_slide: openslide.OpenSlide, level: int, fast: TiledLevelReader
    ) -> bool:
        """Compare a few unaligned regions of ``level`` decoded both ways (see VALIDATION_*)."""
        w, h = self.info.level_dimensions[level]
        ds = self.info.level_downsamples[level]
        rw, rh = min(VALIDATION_REGION_PX, w), min(VALIDATION_REGION_PX, h)
        for fx, fy in VALIDATION_SPOTS:
            lx, ly = int((w - rw) * fx), int((h - rh) * fy)
            location = (int(lx * ds), int(ly * ds))
            try:
                # Fast path first: a tile it cannot decode is most likely corrupt, and then
                # OpenSlide is not even asked.
                mine = fast.read(location, (rw, rh))
                reference = self._read_openslide(location, level, (rw, rh), reference_slide)
            except (SlideReadError, TileDecodeError):
                return False
            if mine is None or mine.shape != reference.shape:
                return False
            diff = np.abs(mine.astype(np.int16) - reference.astype(np.int16))
            if diff.mean() > MAX_MEAN_ABS_DIFF or int(diff.max()) > MAX_ABS_DIFF:
                return False
        return True

    @property
    def fast_levels(self) -> frozenset[int]:
        """Levels read by the validated tile path (validates every candidate level now)."""
        for level in list(self._candidates):
            self._fast_reader(level)
        return frozenset(self._fast)

    @property
    def slide(self) -> openslide.OpenSlide:
        if self._slide is None:
            raise SlideReadError(self.info.slide_id, "the slide has been closed")
        return self._slide

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int], *, copy: bool = True
    ) -> np.ndarray:
        """H×W×3 uint8 RGB of ``size`` px at ``level``, top-left at level-0 ``location``.

        ``copy=False`` allows a read-only view into the tile cache when the region is exactly
        inside one cached tile (saves a copy per patch for callers that copy anyway).
        """
        sid = self.info.slide_id
        if not 0 <= level < self.info.level_count:
            raise SlideReadError(sid, f"level {level} does not exist ({self.info.level_count})")
        width, height = int(size[0]), int(size[1])
        if width <= 0 or height <= 0:
            raise SlideReadError(sid, f"region size must be positive, got {size}")
        fast = self._fast_reader(level)
        if fast is None:
            return self._read_openslide(location, level, size)
        if self._slide is None:
            raise SlideReadError(sid, "the slide has been closed")
        try:
            rgb = fast.read((int(location[0]), int(location[1])), (width, height), copy=copy)
        except TileDecodeError as exc:
            raise SlideReadError(
                sid, f"cannot decode region {size} at {location}, level {level}: {exc}"
            ) from exc
        return rgb if rgb is not None else self._read_openslide(location, level, size)

    def _read_openslide(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        slide: openslide.OpenSlide | None = None,
    ) -> np.ndarray:
        """The reference path: OpenSlide's RGBA composited on white."""
        sid = self.info.slide_id
        try:
            source = slide if slide is not None else self.slide
            image = source.read_region((int(location[0]), int(location[1])), level, size)
            rgba = np.asarray(image)
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise SlideReadError(
                sid, f"cannot decode region {size} at {location}, level {level}: {exc}"
            ) from exc
        return _composite_on_white(rgba)

    def close(self) -> None:
        self._fast = {}
        self._candidates = {}
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __enter__(self) -> WsiReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
