"""Reader processes (the GPU path's readers): same patches as threads, errors named, no leaks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedpath.client.config import EmbeddingConfig, ResolutionConfig
from fedpath.client.embed.extract import extract_features
from fedpath.client.embed.readers import use_processes
from fedpath.client.embed.registry import load_encoder
from fedpath.client.wsi.reader import WsiReader
from fedpath.client.wsi.resolution import plan_read
from fedpath.common.errors import SlideReadError
from tests.test_extract import _grid, _textured_image
from tests.tiffs import write_pyramid

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WsiReader]:
    path = write_pyramid(tmp_path_factory.mktemp("slide") / "tex.tif", _textured_image())
    with WsiReader(path) as reader:
        yield reader


def _shared_segments() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir()} if shm.is_dir() else set()


@pytest.mark.parametrize(
    ("mode", "device", "cores", "expected"),
    [
        ("auto", "cuda", 8, True),
        ("auto", "cuda", 2, False),
        ("auto", "cpu", 64, False),
        ("processes", "cpu", 2, True),
        ("threads", "cuda", 64, False),
    ],
)
def test_processes_only_beside_a_gpu_with_cores_to_spare(
    mode: str, device: str, cores: int, expected: bool
) -> None:
    assert use_processes(mode, device, cores) is expected


@pytest.mark.slow
def test_reader_processes_give_the_threads_features(slide: WsiReader) -> None:
    read = plan_read(slide.info.mpp, slide.info.level_downsamples, ResolutionConfig(patch_size=128))
    coords = _grid(slide, read)[:21]
    tiny = load_encoder("tiny_cnn")
    before = _shared_segments()
    got: dict[str, list[np.ndarray]] = {"threads": [], "processes": []}
    for mode, blocks in got.items():
        cfg = EmbeddingConfig(batch_size=4, readers=mode, reader_threads=2, jit=False)
        stats = extract_features(slide, coords, read, tiny, cfg, blocks.append, precision="float32")
        assert stats.num_patches == 21
    np.testing.assert_array_equal(np.concatenate(got["processes"]), np.concatenate(got["threads"]))
    assert _shared_segments() <= before, "shared batch buffers are unlinked"


@pytest.mark.slow
def test_a_slide_gone_under_the_reader_processes_is_named(tmp_path: Path) -> None:
    """The slide vanishes from its share after the parent opened it: a slide error, no hang."""
    path = write_pyramid(tmp_path / "gone.tif", _textured_image())
    cfg = EmbeddingConfig(batch_size=2, readers="processes", reader_threads=1, jit=False)
    before = _shared_segments()
    with WsiReader(path) as reader:
        read = plan_read(
            reader.info.mpp, reader.info.level_downsamples, ResolutionConfig(patch_size=128)
        )
        coords = _grid(reader, read)[:4]
        path.write_bytes(b"")
        with pytest.raises(SlideReadError) as info:
            extract_features(
                reader,
                coords,
                read,
                load_encoder("tiny_cnn"),
                cfg,
                lambda b: None,
                precision="float32",
            )
    assert info.value.slide == "gone"
    assert "a reader process cannot open the slide again" in info.value.reason
    assert "empty" in info.value.reason
    assert _shared_segments() <= before
