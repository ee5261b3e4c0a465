"""Read RGB regions straight from the tiles of a tiled TIFF page, bypassing OpenSlide's painter.

Why: OpenSlide's ``read_region`` spends ~1.3 ms per 256² patch painting pixels through cairo
even when the tile is cached, while decoding a 256² JPEG tile with imagecodecs costs ~0.3 ms.
Patch embedding reads every patch, so on a small machine the painter, not the encoder, sets the
pace. This module reads the compressed tile bytes with ``os.pread`` (thread-safe: no shared file
position, unlike tifffile's FileHandle), decodes them with the page's own tifffile decoder and
assembles the region itself.

It is only ever used for levels that ``WsiReader`` has matched to exactly one TIFF page and then
validated pixel-by-pixel against OpenSlide at open time; OpenSlide stays the reference and the
fallback for everything else (see ``find_level_pages`` and ``WsiReader``).
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tifffile

FAST_VENDORS = frozenset({"aperio", "generic-tiff"})
"""OpenSlide vendors whose levels are plain tiled TIFF pages (others transform tiles, e.g.
NDPI restart markers, Ventana/Philips overlaps), so only these get a fast path."""

DECODABLE_COMPRESSIONS = frozenset({1, 5, 6, 7, 8, 32946, 50000, 33003, 33005, 34712})
"""none, LZW, old/new JPEG, zlib/deflate, zstd, Aperio JPEG 2000 (YCbCr/RGB), JPEG 2000."""

JPEG_COMPRESSIONS = frozenset({6, 7})
DEFAULT_CACHE_BYTES = 64 * 2**20


class TileDecodeError(Exception):
    """A tile's bytes could not be read or decoded; WsiReader turns it into SlideReadError."""


class TileCache:
    """Thread-safe LRU of decoded tiles bounded in bytes, shared by all levels of one slide.

    Neighbouring patches of the embedding grid share tiles (an unaligned 256² patch touches up
    to four), so keeping recently decoded tiles saves most decodes. Decoding happens outside the
    lock: two threads may occasionally decode the same tile, which is cheaper than serialising.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int], tile: np.ndarray) -> None:
        if tile.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._tiles.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._tiles[key] = tile
            self._bytes += tile.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._tiles.popitem(last=False)
                self._bytes -= evicted.nbytes

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes


def page_supported(page: tifffile.TiffPage) -> bool:
    """Whether tifffile can decode this page's tiles to contiguous 8-bit RGB we can trust."""
    try:
        if not page.is_tiled or page.tiledepth != 1 or page.imagedepth != 1:
            return False
        if page.dtype != np.uint8 or page.samplesperpixel != 3 or page.planarconfig != 1:
            return False
        if page.extrasamples or page.subifds:
            return False
        compression = int(page.compression)
        if compression not in DECODABLE_COMPRESSIONS:
            return False
        if compression != 1 and compression not in tifffile.TIFF.DECOMPRESSORS:
            return False
        photometric = int(page.photometric)
        # YCbCr is only colour-converted by tifffile inside JPEG / JPEG 2000 codecs.
        if photometric == 6 and compression not in {6, 7, 33003, 34712}:
            return False
        return photometric in {2, 6}
    except (AttributeError, KeyError, TypeError, ValueError):
        return False


def find_level_pages(
    tif: tifffile.TiffFile, level_dimensions: Sequence[tuple[int, int]]
) -> dict[int, tifffile.TiffPage]:
    """Map each OpenSlide level to the one decodable tiled page with exactly its dimensions.

    Levels with no such page, or more than one candidate (ambiguous), are left out: OpenSlide
    then serves them.
    """
    if tif.is_ome or any(getattr(p, "subifds", None) for p in tif.pages):
        return {}
    by_size: dict[tuple[int, int], list[tifffile.TiffPage]] = {}
    for page in tif.pages:
        if not isinstance(page, tifffile.TiffPage) or not page.is_tiled:
            continue
        by_size.setdefault((int(page.imagewidth), int(page.imagelength)), []).append(page)
    found: dict[int, tifffile.TiffPage] = {}
    for level, dims in enumerate(level_dimensions):
        pages = by_size.get((int(dims[0]), int(dims[1])), [])
        if len(pages) == 1 and page_supported(pages[0]):
            found[level] = pages[0]
    return found


def level_origin(location: tuple[int, int], downsample: float) -> tuple[int, int] | None:
    """Level coordinates of a level-0 location when they are whole pixels, else None.

    OpenSlide maps a level-0 location to ``x0 / downsample`` and, when that is fractional,
    paints the tiles at a sub-pixel offset (bilinear blend, measured: odd x0 at level 1 differs
    from either neighbouring whole-pixel read by tens of gray levels). Only whole-pixel origins
    can be reproduced by cropping tiles, so fractional ones are left to OpenSlide.
    """
    fx, fy = location[0] / downsample, location[1] / downsample
    if not (fx.is_integer() and fy.is_integer()):
        return None
    return int(fx), int(fy)


class TiledLevelReader:
    """One pyramid level served from one tiled TIFF page: region → tiles → decode → assemble.

    Everything needed at read time is copied out of the tifffile page at construction
    (offsets, byte counts, geometry, the decode closure, JPEG tables), so reads never touch the
    TiffFile and are safe from any number of threads.
    """

    def __init__(
        self,
        fd: int,
        page: tifffile.TiffPage,
        level: int,
        downsample: float,
        cache: TileCache,
    ) -> None:
        self.fd = fd
        self.level = level
        self.downsample = float(downsample)
        self.cache = cache
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        self.tile_width = int(page.tilewidth)
        self.tile_height = int(page.tilelength)
        self.tiles_across = math.ceil(self.width / self.tile_width)
        self.tiles_down = math.ceil(self.height / self.tile_height)
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.bytecounts = np.asarray(page.databytecounts, dtype=np.int64)
        if len(self.offsets) < self.tiles_across * self.tiles_down or len(self.bytecounts) != len(
            self.offsets
        ):
            raise ValueError("tile offsets do not cover the page")
        self.jpegtables: bytes | None = (
            page.jpegtables if int(page.compression) in (JPEG_COMPRESSIONS) else None
        )
        self._decode: Callable[..., Any] = page.decode

    def _tile(self, index: int) -> np.ndarray | None:
        """Decoded tile ``index`` cropped to the level (h×w×3), or None for an empty tile."""
        key = (self.level, index)
        tile = self.cache.get(key)
        if tile is not None:
            return tile
        offset, count = int(self.offsets[index]), int(self.bytecounts[index])
        if count <= 0 or offset <= 0:
            return None
        try:
            data = os.pread(self.fd, count, offset)
        except OSError as exc:
            raise TileDecodeError(f"cannot read tile {index}: {exc}") from exc
        if len(data) != count:
            raise TileDecodeError(
                f"tile {index} is truncated ({len(data)} of {count} bytes at offset {offset})"
            )
        try:
            decoded, _, _ = self._decode(data, index, jpegtables=self.jpegtables)
        except Exception as exc:  # codecs raise their own types (JpegError, zlib.error, ...)
            raise TileDecodeError(f"cannot decode tile {index}: {exc}") from exc
        if decoded is None:
            return None
        row, col = divmod(index, self.tiles_across)
        h = min(self.tile_height, self.height - row * self.tile_height)
        w = min(self.tile_width, self.width - col * self.tile_width)
        tile = np.asarray(decoded)
        if tile.ndim == 4:
            tile = tile[0]
        if tile.ndim != 3 or tile.shape[0] < h or tile.shape[1] < w or tile.shape[2] < 3:
            raise TileDecodeError(f"tile {index} decoded to unexpected shape {tile.shape}")
        tile = np.ascontiguousarray(tile[:h, :w, :3], dtype=np.uint8)
        tile.flags.writeable = False  # shared through the cache between threads
        self.cache.put(key, tile)
        return tile

    def read(
        self, location: tuple[int, int], size: tuple[int, int], *, copy: bool = True
    ) -> np.ndarray | None:
        """H×W×3 uint8 RGB at level-0 ``location``; outside the level (and empty tiles) white.

        None when ``location`` falls between pixels of this level (see ``level_origin``): the
        caller must then use OpenSlide. ``copy=False``: a region inside one cached tile comes
        back as a read-only view of it (the tile stays intact: numpy refuses writes).
        """
        width, height = int(size[0]), int(size[1])
        origin = level_origin(location, self.downsample)
        if origin is None:
            return None
        x, y = origin
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, self.width), min(y + height, self.height)
        if x1 <= x0 or y1 <= y0:
            return np.full((height, width, 3), 255, dtype=np.uint8)
        tw, th = self.tile_width, self.tile_height
        col0, col1 = x0 // tw, (x1 - 1) // tw
        row0, row1 = y0 // th, (y1 - 1) // th
        covered = x0 == x and y0 == y and x1 == x + width and y1 == y + height
        if covered and col0 == col1 and row0 == row1:
            tile = self._tile(row0 * self.tiles_across + col0)
            if tile is None:
                return np.full((height, width, 3), 255, dtype=np.uint8)
            tx, ty = x - col0 * tw, y - row0 * th
            view = tile[ty : ty + height, tx : tx + width]
            # Callers that own the result get a copy; the cached tile must stay intact.
            return view.copy() if copy else view
        out = np.empty((height, width, 3), dtype=np.uint8)
        if not covered:
            out.fill(255)
        for row in range(row0, row1 + 1):
            ty0, ty1 = max(y0, row * th), min(y1, (row + 1) * th)
            for col in range(col0, col1 + 1):
                tx0, tx1 = max(x0, col * tw), min(x1, (col + 1) * tw)
                dest = out[ty0 - y : ty1 - y, tx0 - x : tx1 - x]
                tile = self._tile(row * self.tiles_across + col)
                if tile is None:
                    dest.fill(255)
                else:
                    oy, ox = row * th, col * tw
                    dest[...] = tile[ty0 - oy : ty1 - oy, tx0 - ox : tx1 - ox]
        return out
