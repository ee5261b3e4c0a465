"""Fast tile path of WsiReader: pixel agreement with OpenSlide, edges, threads, errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile

from fedpath.client.wsi.reader import WsiReader
from fedpath.client.wsi.tile_reader import TileCache, level_origin
from fedpath.common.errors import SlideReadError
from fedpath.synthetic.slides import SynthSlideConfig, generate_slide
from tests.tiffs import write_pyramid

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CMU = DATA / "slides" / "cmu-1-small-region.svs"
TCGA = DATA / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
APERIO = "Aperio Image Library v10.0.0\n1536x1024 |AppMag = 20|MPP = 0.5"


def textured(height: int = 1024, width: int = 1536) -> np.ndarray:
    """Smooth colour gradients plus blocks: edges across tile seams, JPEG-friendly."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([(xx * 255 // width), (yy * 255 // height), ((xx + yy) % 256)], axis=-1).astype(
        np.uint8
    )
    rgb[300:700, 200:900] = (200, 60, 160)
    rgb[600:1000, 1000:1400] = (40, 40, 200)
    return rgb


def regions(reader: WsiReader, level: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Aligned, unaligned, 4-tile-spanning, partly and fully outside regions of ``level``."""
    w, h = reader.info.level_dimensions[level]
    ds = int(reader.info.level_downsamples[level])

    def at(x: int, y: int) -> tuple[int, int]:
        return x * ds, y * ds

    return [
        (at(0, 0), (256, 256)),
        (at(256, 256), (256, 256)),
        (at(37, 91), (256, 256)),
        (at(200, 180), (256, 256)),  # spans four tiles
        (at(255, 255), (2, 2)),
        (at(w - 100, h - 60), (256, 256)),  # partly outside (right/bottom)
        (at(-50, -30), (256, 256)),  # partly outside (left/top)
        (at(w + 10, 5), (64, 64)),  # fully outside
        (at(-400, -400), (64, 64)),  # fully outside
        (at(w // 3, h // 4), (300, 200)),  # non-square
    ]


def write_aperio_pyramid(path: Path, rgb: np.ndarray, compression: str) -> Path:
    """Like tests.tiffs.write_pyramid with an Aperio description, but without tifffile's JSON
    metadata: its second ImageDescription tag hides the first from OpenSlide's vendor check."""
    with tifffile.TiffWriter(path) as tw:
        level = rgb
        for index in range(3):
            extra: dict[str, object] = {"subfiletype": 1} if index else {"description": APERIO}
            tw.write(
                level,
                compression=compression,
                photometric="rgb",
                tile=(256, 256),
                metadata=None,
                **extra,
            )
            level = np.ascontiguousarray(level[::2, ::2])
    return path


def assert_matches_openslide(reader: WsiReader, level: int, tol: float = 1.0) -> None:
    for location, size in regions(reader, level):
        fast = reader.read_region(location, level, size)
        ref = reader._read_openslide(location, level, size)
        assert fast.shape == (size[1], size[0], 3) and fast.dtype == np.uint8
        assert fast.flags.c_contiguous
        diff = np.abs(fast.astype(np.int16) - ref.astype(np.int16))
        assert diff.mean() <= tol, (location, size, diff.mean(), diff.max())


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
@pytest.mark.parametrize("aperio", [False, True])
def test_generic_pyramid_matches_openslide(tmp_path: Path, compression: str, aperio: bool) -> None:
    if aperio:
        path = write_aperio_pyramid(tmp_path / "s.svs", textured(), compression)
    else:
        path = write_pyramid(tmp_path / "s.tif", textured(), compression=compression)
    with WsiReader(path) as reader:
        assert reader.info.vendor == ("aperio" if aperio else "generic-tiff")
        assert {0, 1} <= reader.fast_levels
        for level in (0, 1):
            assert_matches_openslide(reader, level)
        if compression == "zlib":  # lossless: identical pixels
            for location, size in regions(reader, 0):
                np.testing.assert_array_equal(
                    reader.read_region(location, 0, size),
                    reader._read_openslide(location, 0, size),
                )


def test_outside_is_white_and_edges_cropped(tmp_path: Path) -> None:
    rgb = textured(1000, 1300)  # not a multiple of the 256 px tile: padded edge tiles
    path = write_pyramid(tmp_path / "edge.tif", rgb, compression="zlib", levels=2)
    with WsiReader(path) as reader:
        assert 0 in reader.fast_levels
        out = reader.read_region((1200, 900), 0, (256, 256))
        np.testing.assert_array_equal(out[:100, :100], rgb[900:1000, 1200:1300])
        assert (out[100:] == 255).all() and (out[:, 100:] == 255).all()
        assert (reader.read_region((5000, 5000), 0, (32, 32)) == 255).all()


def test_view_reads_share_the_cached_tile_read_only(tmp_path: Path) -> None:
    """copy=False (the embedding reader) skips a copy but can never alter the cached tile."""
    rgb = textured()
    path = write_pyramid(tmp_path / "view.tif", rgb, compression="zlib", levels=2)
    with WsiReader(path) as reader:
        assert 0 in reader.fast_levels
        inside_one_tile = ((256, 512), (128, 128))
        view = reader.read_region(*inside_one_tile[:1], 0, inside_one_tile[1], copy=False)
        owned = reader.read_region(*inside_one_tile[:1], 0, inside_one_tile[1])
        np.testing.assert_array_equal(view, rgb[512:640, 256:384])
        np.testing.assert_array_equal(owned, view)
        assert not view.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            view[0, 0] = 0
        assert owned.flags.writeable and not np.shares_memory(owned, view)
        owned[...] = 0  # the caller's copy is its own
        again = reader.read_region((256, 512), 0, (128, 128), copy=False)
        assert np.shares_memory(again, view)
        np.testing.assert_array_equal(again, rgb[512:640, 256:384])
        spanning = reader.read_region((200, 500), 0, (128, 128), copy=False)  # four tiles
        assert spanning.flags.writeable
        np.testing.assert_array_equal(spanning, rgb[500:628, 200:328])


@pytest.mark.slow
def test_synthetic_slide_matches_openslide(tmp_path: Path) -> None:
    cfg = SynthSlideConfig(width_px=2048, height_px=1536)
    slide = generate_slide(tmp_path, "synth", cfg, seed=3)
    with WsiReader(slide.slide_path) as reader:
        assert {0, 1} <= reader.fast_levels
        for level in (0, 1):
            assert_matches_openslide(reader, level)


def test_cmu_svs_matches_openslide() -> None:
    if not CMU.exists():
        pytest.skip(f"{CMU} not present (shared data not downloaded)")
    with WsiReader(CMU) as reader:
        assert reader.info.vendor == "aperio"
        assert 0 in reader.fast_levels
        assert_matches_openslide(reader, 0)


def test_tcga_jpeg2000_fast_or_fallback_and_matches() -> None:
    if not TCGA.exists():
        pytest.skip(f"{TCGA} not present (shared data not downloaded)")
    with WsiReader(TCGA, mpp_override=1.0) as reader:
        for level in range(reader.info.level_count):
            for location, size in [((1000, 800), (256, 256)), ((1234, 567), (256, 256))]:
                fast = reader.read_region(location, level, size)
                ref = reader._read_openslide(location, level, size)
                diff = np.abs(fast.astype(np.int16) - ref.astype(np.int16))
                assert diff.mean() <= 1.0


def test_fractional_level_location_falls_back_to_openslide(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "s.tif", textured(), compression="zlib")
    with WsiReader(path) as reader:
        assert 1 in reader.fast_levels
        # x0 / downsample = 300.5: OpenSlide paints at a sub-pixel offset; we must match it.
        np.testing.assert_array_equal(
            reader.read_region((601, 600), 1, (128, 128)),
            reader._read_openslide((601, 600), 1, (128, 128)),
        )
    assert level_origin((601, 600), 2.0) is None
    assert level_origin((-600, 600), 2.0) == (-300, 300)


@pytest.mark.slow
def test_concurrent_reads_equal_serial(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "s.tif", textured(), compression="jpeg")
    with WsiReader(path) as reader:
        assert 0 in reader.fast_levels
        rng = np.random.default_rng(1)
        locs = [(int(x), int(y)) for x, y in rng.integers(-100, 1400, (200, 2))]
        serial = [reader.read_region(loc, 0, (256, 256)) for loc in locs]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda loc: reader.read_region(loc, 0, (256, 256)), locs))
        for a, b in zip(serial, parallel, strict=True):
            np.testing.assert_array_equal(a, b)


def corrupt_tile(path: Path, index: int) -> None:
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[index], tif.pages[0].databytecounts[index]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(count)
    path.write_bytes(bytes(data))


def test_corrupt_tile_raises_slide_read_error(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "bad.tif", textured(), compression="jpeg", levels=2)
    corrupt_tile(path, 4)  # row 0, col 4: not touched by the open-time validation spots
    with WsiReader(path) as reader:
        assert 0 in reader.fast_levels
        with pytest.raises(SlideReadError, match=r"cannot decode region .* at .*, level 0"):
            reader.read_region((1100, 10), 0, (64, 64))
        # Other tiles still read fine.
        assert reader.read_region((0, 600), 0, (64, 64)).shape == (64, 64, 3)


def test_corrupt_tile_under_validation_disables_level(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "bad.tif", textured(), compression="jpeg", levels=2)
    corrupt_tile(path, 7)  # row 1, col 1 (6 tiles across): under the first validation spot
    with WsiReader(path) as reader:
        assert 0 not in reader.fast_levels
        with pytest.raises(SlideReadError, match="cannot decode region"):
            reader.read_region((300, 300), 0, (64, 64))


def test_fast_tiles_off(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "s.tif", textured(), compression="jpeg")
    with WsiReader(path, fast_tiles=False) as reader:
        assert reader.fast_levels == frozenset()
        assert reader._fd is None


def test_close_releases_fd_and_blocks_reads(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "s.tif", textured(), compression="jpeg")
    reader = WsiReader(path)
    assert reader.fast_levels
    reader.close()
    assert reader._fd is None and reader.fast_levels == frozenset()
    with pytest.raises(SlideReadError, match="closed"):
        reader.read_region((0, 0), 0, (8, 8))


def test_tile_cache_is_bounded() -> None:
    cache = TileCache(max_bytes=3 * 100)
    for i in range(5):
        cache.put((0, i), np.zeros(100, np.uint8))
    assert cache.nbytes == 300
    assert cache.get((0, 0)) is None and cache.get((0, 4)) is not None
