"""Feature extraction pipeline: same features as a plain loop, in order, bounded, fail-fast."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

from fedpath.client.config import EmbeddingConfig, ResolutionConfig
from fedpath.client.embed import extract
from fedpath.client.embed.extract import (
    calibration_batch,
    calibration_images,
    choose_precision,
    cpu_supports_bf16,
    extract_features,
    get_runner,
    measure_bf16_cosine,
    normalise_images,
)
from fedpath.client.embed.registry import LoadedEncoder, load_encoder
from fedpath.client.wsi.reader import WsiReader
from fedpath.client.wsi.resolution import ReadPlan, plan_read
from fedpath.common.errors import SlideReadError
from tests.tiffs import write_pyramid as _write_pyramid

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TILES = DATA / "tiles" / "nct-crc-he"
CMU = DATA / "slides" / "cmu-1-small-region.svs"


def _textured_image(height: int = 1024, width: int = 1536) -> np.ndarray:
    """Smooth colour blobs plus noise, so every patch looks different to an encoder."""
    rng = np.random.default_rng(7)
    coarse = rng.integers(0, 256, size=(height // 64, width // 64, 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    image += rng.integers(-20, 21, size=image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WsiReader]:
    path = _write_pyramid(tmp_path_factory.mktemp("slide") / "tex.tif", _textured_image())
    with WsiReader(path) as reader:
        yield reader


@pytest.fixture(scope="module")
def tiny() -> LoadedEncoder:
    return load_encoder("tiny_cnn")


def _plan(reader: WsiReader, target_mpp: float, patch_size: int) -> ReadPlan:
    cfg = ResolutionConfig(target_mpp=target_mpp, patch_size=patch_size)
    return plan_read(reader.info.mpp, reader.info.level_downsamples, cfg)


def _grid(reader: WsiReader, plan: ReadPlan, seed: int = 0) -> np.ndarray:
    """All full patches of the slide, shuffled: the pipeline must follow the given order."""
    width, height = reader.info.dimensions
    step = plan.patch_size_level0
    xs = np.arange(0, width - step + 1, step)
    ys = np.arange(0, height - step + 1, step)
    coords = np.array([(x, y) for y in ys for x in xs], dtype=np.int64)
    return coords[np.random.default_rng(seed).permutation(len(coords))]


def _direct_features(
    reader: WsiReader, coords: np.ndarray, plan: ReadPlan, encoder: LoadedEncoder
) -> np.ndarray:
    """The obvious single-threaded loop, written independently of the pipeline.

    The pipeline's contract: the 8-bit patch is resized (area filter for downscales, here at
    most 2x where it equals bilinear), then normalised in float32.
    """
    spec = encoder.spec
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    rows = []
    for x, y in coords:
        rgb = reader.read_region((int(x), int(y)), plan.level, (plan.read_size, plan.read_size))
        if plan.read_size > spec.input_size:
            rgb = cv2.resize(rgb, (spec.input_size,) * 2, interpolation=cv2.INTER_AREA)
        elif plan.read_size < spec.input_size:
            rgb = cv2.resize(rgb, (spec.input_size,) * 2, interpolation=cv2.INTER_LINEAR)
        tensor = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0 - mean) / std
        with torch.inference_mode():
            rows.append(encoder.model(tensor[None])[0].numpy())
    return np.stack(rows)


class _Collector:
    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self.progress: list[int] = []

    def sink(self, block: np.ndarray) -> None:
        self.blocks.append(block.copy())

    def tick(self, done: int) -> None:
        self.progress.append(done)

    @property
    def features(self) -> np.ndarray:
        return np.concatenate(self.blocks)


@pytest.mark.parametrize(
    ("target_mpp", "patch_size", "jit"),
    [
        (0.5, 128, True),  # level 0, 128 px read, shrunk to 64 (INTER_AREA)
        (1.0, 64, False),  # level 1 matches exactly: no resize
        (0.25, 64, True),  # level 0 read at 32 px, enlarged to 64 (INTER_LINEAR)
    ],
)
def test_pipeline_matches_a_direct_loop(
    slide: WsiReader, tiny: LoadedEncoder, target_mpp: float, patch_size: int, jit: bool
) -> None:
    plan = _plan(slide, target_mpp, patch_size)
    coords = _grid(slide, plan)[:37]
    cfg = EmbeddingConfig(
        encoder="tiny_cnn", batch_size=8, reader_threads=3, queue_batches=2, jit=jit
    )
    out = _Collector()
    stats = extract_features(
        slide, coords, plan, tiny, cfg, out.sink, precision="float32", progress=out.tick
    )
    assert [b.shape for b in out.blocks] == [(8, 64)] * 4 + [(5, 64)]
    assert all(b.dtype == np.float32 for b in out.blocks)
    assert out.progress == [8, 8, 8, 8, 5]
    assert stats.num_patches == 37 and stats.precision == "float32"
    assert stats.mode == ("jit" if jit else "eager")
    assert stats.seconds > 0 and stats.patches_per_second == pytest.approx(37 / stats.seconds)
    expected = _direct_features(slide, coords, plan, tiny)
    np.testing.assert_allclose(out.features, expected, rtol=1e-4, atol=1e-5)
    # Rows really are in coords order (neighbouring rows differ).
    assert not np.allclose(out.features[0], out.features[1])


def test_empty_coords_give_no_blocks(slide: WsiReader, tiny: LoadedEncoder) -> None:
    out = _Collector()
    plan = _plan(slide, 0.5, 128)
    stats = extract_features(
        slide,
        np.zeros((0, 2), np.int64),
        plan,
        tiny,
        EmbeddingConfig(jit=False),
        out.sink,
        precision="float32",
    )
    assert out.blocks == [] and stats.num_patches == 0


def test_bad_arguments_are_rejected(slide: WsiReader, tiny: LoadedEncoder) -> None:
    plan = _plan(slide, 0.5, 128)
    with pytest.raises(ValueError, match="N×2"):
        extract_features(
            slide, np.zeros((4, 3)), plan, tiny, EmbeddingConfig(), print, precision="float32"
        )
    with pytest.raises(ValueError, match="precision"):
        extract_features(
            slide, np.zeros((4, 2)), plan, tiny, EmbeddingConfig(), print, precision="float64"
        )


class _FaultyReader:
    """A real reader that fails on one location, counting reads (fault injection only)."""

    def __init__(self, reader: WsiReader, fail_at: tuple[int, int] | None, exc: Exception) -> None:
        self._reader = reader
        self.info = reader.info
        self.fail_at = fail_at
        self.exc = exc
        self.reads = 0
        self._lock = threading.Lock()

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int], *, copy: bool = True
    ):
        with self._lock:
            self.reads += 1
        if self.fail_at is not None and tuple(location) == self.fail_at:
            raise self.exc
        return self._reader.read_region(location, level, size, copy=copy)


def _reader_threads_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fedpath-read")]


@pytest.mark.parametrize(
    "exc",
    [
        SlideReadError("tex", "corrupt tile"),
        ValueError("decoder blew up"),
    ],
)
def test_reader_errors_propagate_and_threads_stop(
    slide: WsiReader, tiny: LoadedEncoder, exc: Exception
) -> None:
    plan = _plan(slide, 0.5, 128)
    coords = _grid(slide, plan)
    bad = tuple(int(v) for v in coords[19])
    faulty = _FaultyReader(slide, bad, exc)
    cfg = EmbeddingConfig(batch_size=4, reader_threads=2, queue_batches=2, jit=False)
    out = _Collector()
    start = time.perf_counter()
    with pytest.raises(SlideReadError) as info:
        extract_features(faulty, coords, plan, tiny, cfg, out.sink, precision="float32")  # type: ignore[arg-type]
    assert time.perf_counter() - start < 10
    if isinstance(exc, ValueError):
        assert f"patch at {bad}" in str(info.value) and "decoder blew up" in str(info.value)
    else:
        assert info.value is exc
    # Batches before the bad one were delivered, none after; readers stopped early.
    assert len(out.blocks) <= 4
    assert faulty.reads < len(coords)
    assert _reader_threads_alive() == []


def test_sink_errors_stop_the_readers(slide: WsiReader, tiny: LoadedEncoder) -> None:
    plan = _plan(slide, 0.5, 128)
    coords = _grid(slide, plan)
    counting = _FaultyReader(slide, None, RuntimeError())

    def sink(block: np.ndarray) -> None:
        raise OSError("disk full")

    cfg = EmbeddingConfig(batch_size=4, reader_threads=2, queue_batches=2, jit=False)
    with pytest.raises(OSError, match="disk full"):
        extract_features(counting, coords, plan, tiny, cfg, sink, precision="float32")  # type: ignore[arg-type]
    assert counting.reads <= 4 * 4
    assert _reader_threads_alive() == []


@pytest.mark.slow
def test_read_ahead_is_bounded(slide: WsiReader, tiny: LoadedEncoder) -> None:
    """Memory stays flat: readers never run more than queue_batches batches ahead."""
    plan = _plan(slide, 0.5, 128)
    coords = _grid(slide, plan)
    counting = _FaultyReader(slide, None, RuntimeError())
    batch, depth = 4, 2
    ahead: list[int] = []
    consumed = 0

    def slow_sink(block: np.ndarray) -> None:
        nonlocal consumed
        time.sleep(0.02)  # let the readers run as far ahead as they are allowed to
        ahead.append(counting.reads - consumed)
        consumed += len(block)

    cfg = EmbeddingConfig(batch_size=batch, reader_threads=3, queue_batches=depth, jit=False)
    extract_features(counting, coords, plan, tiny, cfg, slow_sink, precision="float32")  # type: ignore[arg-type]
    assert consumed == len(coords) == counting.reads
    assert max(ahead) <= (depth + 1) * batch
    assert max(ahead) > batch, "reading never overlapped inference"


def test_torch_threads_are_restored(slide: WsiReader, tiny: LoadedEncoder) -> None:
    plan = _plan(slide, 0.5, 128)
    before = torch.get_num_threads()
    seen: list[int] = []
    cfg = EmbeddingConfig(batch_size=8, torch_threads=1, jit=False)
    extract_features(
        slide,
        _grid(slide, plan)[:8],
        plan,
        tiny,
        cfg,
        lambda b: seen.append(torch.get_num_threads()),
        precision="float32",
    )
    assert seen == [1]
    assert torch.get_num_threads() == before


def test_jit_runner_pads_short_batches_and_is_cached(tiny: LoadedEncoder) -> None:
    runner = get_runner(tiny, "float32", 8, jit=True)
    assert runner.mode == "jit" and runner.batch_size == 8
    assert get_runner(tiny, "float32", 8, jit=True) is runner
    x = calibration_batch(tiny.spec, 3, seed=5)
    with torch.inference_mode():
        expected = tiny.model(x)
    got = runner(x)
    assert got.shape == (3, 64)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_calibration_batch_is_deterministic_tissue_like() -> None:
    spec = load_encoder("tiny_cnn").spec
    a, b = calibration_batch(spec, 4, seed=2), calibration_batch(spec, 4, seed=2)
    assert a.shape == (4, 3, 64, 64) and a.dtype == torch.float32
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)
    assert not torch.equal(a, calibration_batch(spec, 4, seed=3))
    rgb = a * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)
    red, green = rgb[:, 0].mean(), rgb[:, 1].mean()
    assert red > green + 0.1, "H&E is pink/purple: red well above green"


def test_cpu_bf16_detection_reads_cpu_flags(tmp_path: Path) -> None:
    with_bf16 = tmp_path / "a"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    without = tmp_path / "b"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    arm = tmp_path / "c"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert cpu_supports_bf16(with_bf16) and cpu_supports_bf16(arm)
    assert not cpu_supports_bf16(without)


def test_choose_precision(tiny: LoadedEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_precision(tiny, EmbeddingConfig(precision="float32")) == ("float32", None)
    assert choose_precision(tiny, EmbeddingConfig(precision="bfloat16")) == ("bfloat16", None)
    monkeypatch.setattr(extract, "cpu_supports_bf16", lambda: False)
    assert choose_precision(tiny, EmbeddingConfig(batch_size=8)) == ("float32", None)
    monkeypatch.setattr(extract, "cpu_supports_bf16", lambda: True)
    precision, cosine = choose_precision(tiny, EmbeddingConfig(batch_size=8))
    assert cosine is not None and 0.99 < cosine < 1.0
    assert precision == ("bfloat16" if cosine >= 0.999 else "float32")
    strict = EmbeddingConfig(batch_size=8, min_bf16_cosine=1.0)
    assert choose_precision(tiny, strict) == ("float32", cosine)


def test_bf16_pipeline_stays_close_to_float32(slide: WsiReader, tiny: LoadedEncoder) -> None:
    plan = _plan(slide, 0.5, 128)
    coords = _grid(slide, plan)[:16]
    cfg = EmbeddingConfig(batch_size=8)
    f32, bf16 = _Collector(), _Collector()
    extract_features(slide, coords, plan, tiny, cfg, f32.sink, precision="float32")
    stats = extract_features(slide, coords, plan, tiny, cfg, bf16.sink, precision="bfloat16")
    assert stats.precision == "bfloat16"
    a, b = f32.features, bf16.features
    assert not np.array_equal(a, b), "bfloat16 autocast had no effect"
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99


def test_real_slide_pipeline_matches_direct_loop(tiny: LoadedEncoder) -> None:
    if not CMU.exists():
        pytest.skip(f"shared test slide not found at {CMU}")
    with WsiReader(CMU) as reader:
        plan = _plan(reader, 0.5, 256)
        coords = _grid(reader, plan)[:20]
        out = _Collector()
        cfg = EmbeddingConfig(batch_size=8, reader_threads=2)
        extract_features(reader, coords, plan, tiny, cfg, out.sink, precision="float32")
        np.testing.assert_allclose(
            out.features, _direct_features(reader, coords, plan, tiny), rtol=1e-4, atol=1e-5
        )


@pytest.mark.slow
def test_efficientnet_bf16_matches_float32_on_real_tiles() -> None:
    tiles = sorted(TILES.glob("*.tif"))
    if not tiles:
        pytest.skip(f"real H&E tiles not found in {TILES}")
    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bfloat16")
    enc = load_encoder("efficientnet_lite0")
    images = np.stack([tifffile.imread(p)[..., :3] for p in tiles]).astype(np.float32) / 255.0
    x = torch.from_numpy((images - enc.spec.mean) / enc.spec.std).float().permute(0, 3, 1, 2)
    with torch.inference_mode():
        reference = enc.model(x)
    for jit in (False, True):
        got = get_runner(enc, "bfloat16", 16, jit=jit)(x)
        cosine = torch.nn.functional.cosine_similarity(got, reference, dim=1)
        assert float(cosine.mean()) >= 0.999, (jit, cosine)
        assert float(cosine.min()) >= 0.995, (jit, cosine)
    mean_cos, min_cos = measure_bf16_cosine(enc, EmbeddingConfig(batch_size=16))
    assert 0.999 <= mean_cos <= 1.0 and min_cos <= mean_cos
    assert choose_precision(enc, EmbeddingConfig(batch_size=16)) == ("bfloat16", mean_cos)


def test_torchscript_encoder_runs_in_the_pipeline(slide: WsiReader, tmp_path: Path) -> None:
    """A hospital's own TorchScript checkpoint: frozen as is, autocast applied when it runs."""
    from fedpath.client.embed.models import TinyCNN

    path = tmp_path / "site_encoder.pt"
    traced = torch.jit.trace(TinyCNN(seed=4).eval(), torch.zeros(1, 3, 64, 64))
    torch.jit.save(traced, str(path))
    Path(f"{path}.json").write_text('{"input_size": 64}')
    encoder = load_encoder(str(path))
    plan = _plan(slide, 0.5, 128)
    coords = _grid(slide, plan)[:12]
    cfg = EmbeddingConfig(batch_size=8)
    f32, bf16 = _Collector(), _Collector()
    stats = extract_features(slide, coords, plan, encoder, cfg, f32.sink, precision="float32")
    assert stats.mode == "jit"
    np.testing.assert_allclose(
        f32.features, _direct_features(slide, coords, plan, encoder), rtol=1e-4, atol=1e-5
    )
    extract_features(slide, coords, plan, encoder, cfg, bf16.sink, precision="bfloat16")
    a, b = f32.features, bf16.features
    assert not np.array_equal(a, b), "autocast was not applied to the TorchScript graph"
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99


def test_resampling_is_bilinear_up_to_2x_and_area_beyond() -> None:
    import cv2

    from fedpath.client.embed.readers import resample_interpolation

    assert resample_interpolation(256, 224) == cv2.INTER_LINEAR
    assert resample_interpolation(448, 224) == cv2.INTER_LINEAR
    assert resample_interpolation(449, 224) == cv2.INTER_AREA
    assert resample_interpolation(200, 224) == cv2.INTER_LINEAR  # upsampling


def test_bilinear_256_to_224_stays_close_to_area_on_real_tiles() -> None:
    """The measured reason for the rule: on real H&E, the two resizes barely differ."""
    import cv2

    tiles = sorted(
        (Path(__file__).resolve().parents[2] / "shared/data/tiles/nct-crc-he").glob("*.tif")
    )
    if not tiles:
        pytest.skip("../shared/data/tiles/nct-crc-he is not present")
    for tile in tiles:
        rgb = cv2.cvtColor(cv2.imread(str(tile)), cv2.COLOR_BGR2RGB).astype(np.float32)
        big = cv2.resize(rgb, (256, 256), interpolation=cv2.INTER_CUBIC)
        area = cv2.resize(big, (224, 224), interpolation=cv2.INTER_AREA)
        linear = cv2.resize(big, (224, 224), interpolation=cv2.INTER_LINEAR)
        assert float(np.abs(area - linear).mean()) < 2.0, tile.name  # of 255


@pytest.mark.parametrize("jit", [False, True])
def test_pixel_runner_normalises_uint8_like_the_float_model(tiny: LoadedEncoder, jit: bool) -> None:
    """The pipeline feeds 8-bit RGB; the runner (traced: inside its graph) normalises it."""
    images = calibration_images(tiny.spec, 5, seed=7)
    assert images.dtype == torch.uint8
    assert images.is_contiguous(memory_format=torch.channels_last)
    runner = get_runner(tiny, "float32", 8, jit=jit, pixels=True)
    assert runner is not get_runner(tiny, "float32", 8, jit=jit)
    assert runner.mode == ("jit" if jit else "eager")
    if jit:
        assert runner.normalise is None  # the graph itself is a PixelEncoder
    with torch.inference_mode():
        expected = tiny.model(calibration_batch(tiny.spec, 5, seed=7))
    torch.testing.assert_close(runner(images), expected, rtol=1e-4, atol=1e-5)


def test_normalise_images_matches_the_encoder_spec() -> None:
    spec = load_encoder("tiny_cnn").spec
    images = calibration_images(spec, 2, seed=1)
    got = normalise_images(spec, images)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    torch.testing.assert_close(got, (images.float() / 255.0 - mean) / std)
