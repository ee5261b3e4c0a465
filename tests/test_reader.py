"""WsiReader: opening real and generated slides, clear errors for bad files, RGB reads."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from fedpath.client.wsi import reader as reader_module
from fedpath.client.wsi.reader import WsiReader, _composite_on_white, resolve_mpp
from fedpath.common.errors import MissingMppError, SlideOpenError, SlideReadError
from tests.tiffs import write_pyramid

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CMU = DATA / "slides" / "cmu-1-small-region.svs"
TCGA = DATA / "slides" / "tcga-cr-7395-01a-01-ts1.svs"


def pattern_image(height: int = 1024, width: int = 1536) -> np.ndarray:
    """Glass with a magenta block and a blue block at known places."""
    rgb = np.full((height, width, 3), 242, dtype=np.uint8)
    rgb[256:768, 256:768] = (200, 60, 160)
    rgb[512:1024, 1024:1536] = (40, 40, 200)
    return rgb


@pytest.fixture()
def slide_path(tmp_path: Path) -> Path:
    return write_pyramid(tmp_path / "slide-a.tif", pattern_image())


# ---------------------------------------------------------------- resolve_mpp


def test_resolve_mpp_override_wins() -> None:
    props = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}
    assert resolve_mpp(props, 0.5, "s") == (0.5, "override")


def test_resolve_mpp_averages_x_and_y() -> None:
    props = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.27"}
    mpp, source = resolve_mpp(props, None, "s")
    assert mpp == pytest.approx(0.26)
    assert source == "slide"
    assert resolve_mpp({"openslide.mpp-x": "0.499"}, None, "s") == (0.499, "slide")


def test_resolve_mpp_from_objective_power() -> None:
    mpp, source = resolve_mpp({"openslide.objective-power": "40"}, None, "s")
    assert mpp == pytest.approx(0.25)
    assert source == "objective_power"
    # Garbage or zero MPP values are ignored in favour of the objective power.
    props = {"openslide.mpp-x": "0", "openslide.mpp-y": "abc", "openslide.objective-power": "20"}
    assert resolve_mpp(props, None, "s") == (0.5, "objective_power")


def test_resolve_mpp_missing_names_slide() -> None:
    with pytest.raises(MissingMppError, match="slide-x") as info:
        resolve_mpp({"openslide.objective-power": "nan"}, None, "slide-x")
    assert info.value.slide == "slide-x"
    assert "override" in info.value.reason


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_resolve_mpp_rejects_bad_override(bad: float) -> None:
    with pytest.raises(MissingMppError, match="override"):
        resolve_mpp({"openslide.mpp-x": "0.5"}, bad, "s")


# ---------------------------------------------------------------- compositing


def test_composite_on_white() -> None:
    rgba = np.array(
        [[[0, 0, 0, 0], [100, 50, 0, 255], [0, 0, 0, 128], [200, 100, 50, 51]]], dtype=np.uint8
    )
    out = _composite_on_white(rgba)
    assert out.dtype == np.uint8
    assert out.shape == (1, 4, 3)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [100, 50, 0]
    assert out[0, 2].tolist() == [127, 127, 127]  # 255·127/255 rounded
    expected = np.round((np.array([200, 100, 50]) * 51 + 255 * 204) / 255)
    assert out[0, 3].tolist() == expected.astype(int).tolist()


# ---------------------------------------------------------------- generated slides


def test_open_generated_pyramid(slide_path: Path) -> None:
    with WsiReader(slide_path) as reader:
        info = reader.info
        assert info.slide_id == "slide-a"
        assert info.vendor == "generic-tiff"
        assert info.dimensions == (1536, 1024)
        assert info.level_dimensions == ((1536, 1024), (768, 512), (384, 256))
        assert info.level_downsamples == (1.0, 2.0, 4.0)
        assert info.mpp == pytest.approx(0.5)
        assert info.mpp_source == "slide"
        assert info.objective_power is None
        assert info.level_mpp(2) == pytest.approx(2.0)


def test_read_region_returns_rgb_at_level0_coordinates(slide_path: Path) -> None:
    with WsiReader(slide_path, slide_id="custom") as reader:
        assert reader.info.slide_id == "custom"
        block = reader.read_region((300, 300), 0, (64, 32))
        assert block.shape == (32, 64, 3)
        assert block.dtype == np.uint8
        assert np.all(block == np.array([200, 60, 160], dtype=np.uint8))
        # Level 1, location still in level-0 px: the blue block starts at (1024, 512).
        blue = reader.read_region((1100, 600), 1, (16, 16))
        assert np.all(blue == np.array([40, 40, 200], dtype=np.uint8))
        glass = reader.read_region((0, 0), 2, (8, 8))
        assert np.all(glass == 242)


def test_read_outside_slide_is_white_not_black(slide_path: Path) -> None:
    with WsiReader(slide_path) as reader:
        region = reader.read_region((1500, 1000), 0, (100, 100))
        assert np.all(region[:24, :36] == np.array([40, 40, 200], dtype=np.uint8))  # inside
        assert np.all(region[30:, :] == 255)  # below the slide: transparent → white
        assert np.all(region[:, 40:] == 255)  # right of the slide


def test_read_region_errors(slide_path: Path) -> None:
    reader = WsiReader(slide_path)
    with pytest.raises(SlideReadError, match="level 5"):
        reader.read_region((0, 0), 5, (4, 4))
    with pytest.raises(SlideReadError, match="positive"):
        reader.read_region((0, 0), 0, (0, 4))
    reader.close()
    reader.close()  # idempotent
    with pytest.raises(SlideReadError, match="closed"):
        reader.read_region((0, 0), 0, (4, 4))


def test_concurrent_reads_match_serial_reads(slide_path: Path) -> None:
    rng = np.random.default_rng(0)
    locations = [tuple(int(v) for v in rng.integers(0, 1200, size=2)) for _ in range(64)]
    with WsiReader(slide_path) as reader:
        serial = [reader.read_region(loc, 0, (48, 48)) for loc in locations]
        results: list[np.ndarray | None] = [None] * len(locations)

        def work(indices: range) -> None:
            for i in indices:
                results[i] = reader.read_region(locations[i], 0, (48, 48))

        threads = [threading.Thread(target=work, args=(range(k, 64, 4),)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for expected, got in zip(serial, results, strict=True):
        assert got is not None
        assert np.array_equal(expected, got)


def test_missing_mpp_raises_unless_override(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "nompp.tif", pattern_image(512, 512), mpp=None, levels=1)
    with pytest.raises(MissingMppError, match="nompp"):
        WsiReader(path)
    with WsiReader(path, mpp_override=0.25) as reader:
        assert (reader.info.mpp, reader.info.mpp_source) == (0.25, "override")


# ---------------------------------------------------------------- bad files


def _assert_open_error(path: Path, fragment: str) -> None:
    with pytest.raises(SlideOpenError) as info:
        WsiReader(path, slide_id="bad-slide")
    assert info.value.slide == "bad-slide"
    assert fragment in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    _assert_open_error(tmp_path / "nope.svs", "not found")


def test_directory_is_not_a_slide(tmp_path: Path) -> None:
    _assert_open_error(tmp_path, "not a regular file")


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.svs"
    path.write_bytes(b"")
    _assert_open_error(path, "empty (0 bytes)")


def test_text_file_named_svs(tmp_path: Path) -> None:
    path = tmp_path / "notes.svs"
    path.write_text("slide_id,path\nA,a.svs\n")
    _assert_open_error(path, "not a slide format")


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_tiff(tmp_path: Path, slide_path: Path, keep: float) -> None:
    data = slide_path.read_bytes()
    path = tmp_path / "truncated.tif"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SlideOpenError, match="bad-slide"):
        WsiReader(path, slide_id="bad-slide")


def test_untiled_tiff_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "untiled.tif"
    tifffile.imwrite(path, pattern_image(256, 256))
    _assert_open_error(path, "not a slide format")


def test_webp_tiff_is_rejected(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "webp.tif", pattern_image(512, 512), compression="webp")
    _assert_open_error(path, "OpenSlide cannot open")


class _FakeSlide:
    """Stands in for an OpenSlide handle whose header declares absurd dimensions."""

    def __init__(self, path: str) -> None:
        self.level_dimensions = ((2_000_000, 1000),)
        self.level_downsamples = (1.0,)
        self.properties = {"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.5"}
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_absurd_dimensions_are_refused(slide_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader_module.openslide, "OpenSlide", _FakeSlide)
    _assert_open_error(slide_path, "2000000x1000")


def test_openslide_errors_are_caught_as_classes() -> None:
    # The reader relies on this hierarchy to give "unsupported" its own message.
    assert issubclass(openslide.OpenSlideUnsupportedFormatError, openslide.OpenSlideError)


# ---------------------------------------------------------------- real slides


def test_cmu_small_region_resolution() -> None:
    if not CMU.exists():
        pytest.skip(f"shared test slide not available: {CMU}")
    with WsiReader(CMU) as reader:
        info = reader.info
        assert info.vendor == "aperio"
        assert info.dimensions == (2220, 2967)
        assert info.level_dimensions == ((2220, 2967),)
        assert info.mpp == pytest.approx(0.499)
        assert info.mpp_source == "slide"
        assert info.objective_power == 20.0
        region = reader.read_region((1000, 1500), 0, (64, 64))
        assert region.shape == (64, 64, 3)
        assert region.std() > 5  # real tissue, not a blank read


def test_tcga_slide_without_mpp_needs_override() -> None:
    if not TCGA.exists():
        pytest.skip(f"shared test slide not available: {TCGA}")
    with pytest.raises(MissingMppError, match="tcga-cr-7395-01a-01-ts1"):
        WsiReader(TCGA)
    with WsiReader(TCGA, mpp_override=1.0) as reader:
        assert reader.info.mpp_source == "override"
        assert reader.info.level_dimensions == ((4443, 3567), (2221, 1783))
        assert reader.info.objective_power is None
        assert reader.read_region((2000, 1500), 1, (32, 32)).shape == (32, 32, 3)
