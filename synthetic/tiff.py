"""Stream a pyramidal, OpenSlide-readable TIFF from a tile renderer with bounded memory.

Layout (what OpenSlide accepts, checked on this machine): every level a top-level tiled page,
largest first; reduced levels flagged ``subfiletype=1``; JPEG tiles with photometric RGB;
resolution tags in px/cm; an Aperio-style level-0 ImageDescription so OpenSlide reports MPP
and objective power (vendor "aperio").

Level 0 is never held in memory: tiles are rendered and JPEG-encoded by a thread pool
(OpenCV, numpy and libjpeg release the GIL) a bounded window ahead of the writer, and handed
to tifffile as pre-encoded bytes. Level 1 is built band by band from each tile's 4× reduction
and kept only as JPEG bytes; level 2 (1/256 of level 0) is the one level held as pixels, and
the smaller levels are derived from it.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import tifffile

from fedpath.common.atomic import atomic_path

TILE = 256
LEVEL_FACTOR = 4
MIN_LEVEL_SIDE = 1000
"""Stop adding pyramid levels once the last one is smaller than this on its longer side."""
BIGTIFF_RAW_BYTES = 2**31
"""Switch to BigTIFF past this uncompressed size: JPEG rarely compresses below 2:1 safely."""

TileRenderer = Callable[[int, int], np.ndarray | None]
"""(tile_x, tile_y) → TILE×TILE×3 uint8, or None for a tile of plain background."""


@dataclass(frozen=True)
class PyramidInfo:
    level_dimensions: tuple[tuple[int, int], ...]
    tissue_tiles: int
    total_tiles: int


def aperio_description(
    width: int, height: int, quality: int, mpp: float | None, objective: float | None
) -> str:
    """Level-0 ImageDescription in the Aperio layout; omitted keys stay unknown to OpenSlide."""
    parts = [
        f"Aperio Image Library v10.0.0\n{width}x{height} [0,0 {width}x{height}] "
        f"({TILE}x{TILE}) JPEG/RGB Q={quality}"
    ]
    if objective is not None:
        parts.append(f"AppMag = {objective:g}")
    if mpp is not None:
        parts.append(f"MPP = {mpp:.6g}")
    parts.append("Generator = fedpath synthetic")
    return "|".join(parts)


def _encode(tile: np.ndarray, quality: int) -> bytes:
    """JPEG exactly as tifffile writes it for photometric='rgb' (YCbCr, 2×2 subsampling)."""
    return bytes(
        imagecodecs.jpeg_encode(
            tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
        )
    )


def _resolution(mpp: float | None, downsample: float) -> dict[str, object]:
    if mpp is None:
        return {"resolution": None, "resolutionunit": None}
    px_per_cm = 1e4 / (mpp * downsample)
    return {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}


def _reduce(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter downsample by ``factor`` (edge-replicated up to a multiple of it)."""
    h, w = image.shape[:2]
    hp, wp = math.ceil(h / factor) * factor, math.ceil(w / factor) * factor
    if (hp, wp) != (h, w):
        image = np.pad(image, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge")
    return cv2.resize(image, (wp // factor, hp // factor), interpolation=cv2.INTER_AREA)


class _Level1Bands:
    """Level 1 assembled band by band (one level-1 tile row = 4 level-0 tile rows).

    Render threads drop each tile's 4× reduction into its band; when the writer has consumed
    the last tile of a band, the band is JPEG-encoded into level-1 tiles (kept as bytes,
    ~10× smaller than pixels), reduced 4× again into the in-memory level 2, and freed. Peak
    memory is a few bands plus level 2 (1/256 of level 0), whatever the slide size.
    """

    def __init__(self, width: int, height: int, background: tuple[int, int, int]) -> None:
        self.width = math.ceil(width / LEVEL_FACTOR)
        self.height = math.ceil(height / LEVEL_FACTOR)
        self.tiles_x = math.ceil(self.width / TILE)
        self.background = np.asarray(background, dtype=np.uint8)
        self.level2 = np.empty(
            (math.ceil(self.height / LEVEL_FACTOR), math.ceil(self.width / LEVEL_FACTOR), 3),
            dtype=np.uint8,
        )
        self.level2[...] = self.background
        self._bands: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _band(self, index: int) -> np.ndarray:
        with self._lock:
            band = self._bands.get(index)
            if band is None:
                band = np.empty((TILE, self.tiles_x * TILE, 3), dtype=np.uint8)
                band[...] = self.background
                self._bands[index] = band
            return band

    def put(self, tx: int, ty: int, tile: np.ndarray) -> None:
        """Store a level-0 tile's reduction (called from render threads)."""
        step = TILE // LEVEL_FACTOR
        small = cv2.resize(tile, (step, step), interpolation=cv2.INTER_AREA)
        row = (ty % LEVEL_FACTOR) * step
        self._band(ty // LEVEL_FACTOR)[row : row + step, tx * step : (tx + 1) * step] = small

    def finish(self, index: int) -> list[np.ndarray]:
        """Close band ``index``: update level 2 and return its level-1 tiles, left to right."""
        with self._lock:
            band = self._bands.pop(index, None)
        if band is None:
            band = np.empty((TILE, self.tiles_x * TILE, 3), dtype=np.uint8)
            band[...] = self.background
        rows = min(TILE, self.height - index * TILE)
        reduced = _reduce(band[:rows, : self.width], LEVEL_FACTOR)
        start = index * (TILE // LEVEL_FACTOR)
        self.level2[start : start + reduced.shape[0]] = reduced[:, : self.level2.shape[1]]
        return [band[:, j * TILE : (j + 1) * TILE] for j in range(self.tiles_x)]


def write_pyramid(
    path: Path,
    width: int,
    height: int,
    render: TileRenderer,
    *,
    background: tuple[int, int, int],
    mpp: float | None,
    objective: float | None,
    quality: int = 85,
    workers: int = 2,
) -> PyramidInfo:
    """Write the slide atomically; ``mpp``/``objective`` None leave them out of the file."""
    tiles_x, tiles_y = math.ceil(width / TILE), math.ceil(height / TILE)
    level1 = _Level1Bands(width, height, background)
    blank = np.broadcast_to(np.asarray(background, dtype=np.uint8), (TILE, TILE, 3))
    blank_bytes = _encode(np.ascontiguousarray(blank), quality)
    level1_tiles: list[Future[bytes]] = []
    tissue_tiles = 0

    def job(index: int) -> bytes | None:
        ty, tx = divmod(index, tiles_x)
        tile = render(tx, ty)
        if tile is None:
            return None
        level1.put(tx, ty, tile)
        return _encode(tile, quality)

    def level0_tiles(pool: ThreadPoolExecutor) -> Iterator[bytes]:
        nonlocal tissue_tiles
        total = tiles_x * tiles_y
        window = max(4, 4 * workers)
        pending: deque[Future[bytes | None]] = deque()
        submitted = 0
        while submitted < min(window, total):
            pending.append(pool.submit(job, submitted))
            submitted += 1
        done = 0
        while pending:
            data = pending.popleft().result()
            if submitted < total:
                pending.append(pool.submit(job, submitted))
                submitted += 1
            ty, tx = divmod(done, tiles_x)
            done += 1
            # Results arrive in order, so every tile of this band has been rendered.
            if tx == tiles_x - 1 and (ty % LEVEL_FACTOR == LEVEL_FACTOR - 1 or ty == tiles_y - 1):
                for tile in level1.finish(ty // LEVEL_FACTOR):
                    level1_tiles.append(pool.submit(_encode, tile, quality))
            if data is None:
                yield blank_bytes
            else:
                tissue_tiles += 1
                yield data

    dims = [(width, height), (level1.width, level1.height)]
    common = {
        "tile": (TILE, TILE),
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": quality},
        "metadata": None,
    }
    with (
        atomic_path(path) as tmp,
        tifffile.TiffWriter(tmp, bigtiff=width * height * 3 >= BIGTIFF_RAW_BYTES) as tw,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synth-tile") as pool,
    ):
        tw.write(
            level0_tiles(pool),
            shape=(height, width, 3),
            dtype=np.uint8,
            description=aperio_description(width, height, quality, mpp, objective),
            **_resolution(mpp, 1.0),
            **common,
        )
        tw.write(
            (f.result() for f in level1_tiles),
            shape=(level1.height, level1.width, 3),
            dtype=np.uint8,
            subfiletype=1,
            **_resolution(mpp, width / level1.width),
            **common,
        )
        previous = max(level1.width, level1.height)
        level = level1.level2
        while previous >= MIN_LEVEL_SIDE:
            lh, lw = level.shape[:2]
            previous = max(lh, lw)
            dims.append((lw, lh))
            tw.write(
                level,
                subfiletype=1,
                maxworkers=workers,
                **_resolution(mpp, width / lw),
                **common,
            )
            level = _reduce(level, LEVEL_FACTOR)
    return PyramidInfo(
        level_dimensions=tuple(dims), tissue_tiles=tissue_tiles, total_tiles=tiles_x * tiles_y
    )
