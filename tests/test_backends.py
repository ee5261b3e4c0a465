"""CPU inference engines: export cache, feature faithfulness, per-machine choice, fallbacks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpath.client.config import EmbeddingConfig, ResolutionConfig
from fedpath.client.embed import backends, inference
from fedpath.client.embed.backends import EngineRunner, build_engine, export_onnx, export_path
from fedpath.client.embed.extract import (
    calibration_images,
    cosines,
    extract_features,
    get_runner,
    normalise_images,
    planned_runner_key,
)
from fedpath.client.embed.inference import batch_for_memory, plan_inference
from fedpath.client.embed.registry import LoadedEncoder, load_encoder
from fedpath.client.wsi.reader import WsiReader
from fedpath.client.wsi.resolution import plan_read
from fedpath.common.errors import ConfigError, DeviceError
from tests.test_extract import _grid, _textured_image
from tests.tiffs import write_pyramid

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")


@pytest.fixture
def tiny() -> LoadedEncoder:
    return load_encoder("tiny_cnn")  # fresh per test: runners are cached on the encoder


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WsiReader]:
    path = write_pyramid(tmp_path_factory.mktemp("slide") / "tex.tif", _textured_image())
    with WsiReader(path) as reader:
        yield reader


def _reference(encoder: LoadedEncoder, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return encoder.model(normalise_images(encoder.spec, images))


@pytest.mark.slow
def test_export_is_cached_by_weights(tiny: LoadedEncoder, tmp_path: Path) -> None:
    path, fresh = export_onnx(tiny, tmp_path)
    assert fresh and path.is_file() and path == export_path(tiny, tmp_path)
    mtime = path.stat().st_mtime_ns
    again, fresh_again = export_onnx(tiny, tmp_path)
    assert again == path and not fresh_again and path.stat().st_mtime_ns == mtime
    other = load_encoder("tiny_cnn")
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    changed = LoadedEncoder(other.spec, other.model, "different-weights", None)
    assert export_path(changed, tmp_path) != path
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "no temporaries"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_engine_features_match_pytorch_float32(
    tiny: LoadedEncoder, tmp_path: Path, engine: str
) -> None:
    runner, notes = build_engine(engine, tiny, "float32", 2, tmp_path)
    assert notes and "exported tiny_cnn" in notes[0]
    images = calibration_images(tiny.spec, 6, seed=3)
    got = runner(images)
    assert got.shape == (6, tiny.spec.feature_dim) and got.dtype == torch.float32
    assert float(cosines(got, _reference(tiny, images)).min()) > 0.99999
    assert runner(images, rows=4).shape[0] == 4


def test_onnx_refuses_bfloat16(tiny: LoadedEncoder, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="float32 only"):
        build_engine("onnx", tiny, "bfloat16", 2, tmp_path)


def test_corrupt_cached_graph_is_exported_again(tiny: LoadedEncoder, tmp_path: Path) -> None:
    path, _ = export_onnx(tiny, tmp_path)
    path.write_bytes(b"not an onnx graph")
    runner, notes = build_engine("onnx", tiny, "float32", 2, tmp_path)
    assert any("re-exported" in n for n in notes)
    images = calibration_images(tiny.spec, 2)
    assert float(cosines(runner(images), _reference(tiny, images)).min()) > 0.99999


def test_unwritable_cache_exports_for_this_run(tiny: LoadedEncoder, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    cfg = EmbeddingConfig(backend="onnx", export_cache=blocker, batch_size=4)
    plan = plan_inference(tiny, cfg)
    assert plan.backend == "onnx"
    assert any("not writable" in n and "this run only" in n for n in plan.notes)


def test_explicit_engine_is_planned_and_used_by_extraction(
    tiny: LoadedEncoder, tmp_path: Path, slide: WsiReader
) -> None:
    cfg = EmbeddingConfig(backend="onnx", export_cache=tmp_path, batch_size=4, precision="float32")
    plan = plan_inference(tiny, cfg)
    assert (plan.backend, plan.device, plan.precision) == ("onnx", "cpu", "float32")
    assert plan.backend_cosine is not None and plan.backend_cosine > 0.9999
    assert plan.describe().startswith("onnx on cpu, float32, batch 4")
    read = plan_read(slide.info.mpp, slide.info.level_downsamples, ResolutionConfig(patch_size=128))
    coords = _grid(slide, read)[:10]
    blocks: list[np.ndarray] = []
    stats = extract_features(slide, coords, read, tiny, cfg, blocks.append, precision="float32")
    assert stats.mode == "onnx" and stats.num_patches == 10
    torch_blocks: list[np.ndarray] = []
    fresh = load_encoder("tiny_cnn")
    extract_features(
        slide,
        coords,
        read,
        fresh,
        EmbeddingConfig(batch_size=4),
        torch_blocks.append,
        precision="float32",
    )
    got, want = np.concatenate(blocks), np.concatenate(torch_blocks)
    assert float(cosines(torch.from_numpy(got), torch.from_numpy(want)).min()) > 0.9999


def test_auto_measures_once_and_remembers(tiny: LoadedEncoder, tmp_path: Path) -> None:
    cfg = EmbeddingConfig(export_cache=tmp_path, batch_size=4, precision="float32")
    first = plan_inference(tiny, cfg)
    assert set(first.rates) == {"torch", "onnx", "openvino"}
    assert first.backend == max(first.rates, key=lambda k: first.rates[k])
    choice = json.loads(backends.choice_path(tiny, tmp_path).read_text())
    (entry,) = choice.values()
    assert entry["backend"] == first.backend
    second = plan_inference(load_encoder("tiny_cnn"), cfg)
    assert second.backend == first.backend and second.rates == {}
    assert any("last measured" in n for n in second.notes)


def test_engine_failing_the_cosine_gate_is_not_used(
    tiny: LoadedEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def wrong(*_args: object) -> tuple[EngineRunner, list[str]]:
        return EngineRunner(lambda px: np.ones((px.shape[0], 64), np.float32), "onnx"), []

    monkeypatch.setattr(inference, "build_engine", wrong)
    plan = plan_inference(tiny, EmbeddingConfig(backend="onnx", export_cache=tmp_path))
    assert plan.backend == "torch" and plan.backend_cosine is None
    assert any("not used" in n and "cosine" in n for n in plan.notes)
    assert not isinstance(tiny.runners[planned_runner_key("float32")], EngineRunner)


def test_engine_wrong_on_real_patches_falls_back_before_writing(
    tiny: LoadedEncoder, tmp_path: Path, slide: WsiReader
) -> None:
    """Right on the calibration batch, wrong on a slide: no wrong feature reaches the sink."""
    cfg = EmbeddingConfig(backend="onnx", export_cache=tmp_path, batch_size=4)
    plan_inference(tiny, cfg)
    good = tiny.runners[planned_runner_key("float32")]
    assert isinstance(good, EngineRunner)
    tiny.runners[planned_runner_key("float32")] = EngineRunner(
        lambda px: -good.run_nhwc(px), "onnx"
    )
    read = plan_read(slide.info.mpp, slide.info.level_downsamples, ResolutionConfig(patch_size=128))
    coords = _grid(slide, read)[:9]
    blocks: list[np.ndarray] = []
    with pytest.warns(RuntimeWarning, match="PyTorch encodes from here on"):
        stats = extract_features(slide, coords, read, tiny, cfg, blocks.append, precision="float32")
    assert stats.mode != "onnx"
    want: list[np.ndarray] = []
    extract_features(
        slide,
        coords,
        read,
        load_encoder("tiny_cnn"),
        EmbeddingConfig(batch_size=4),
        want.append,
        precision="float32",
    )
    got = torch.from_numpy(np.concatenate(blocks))
    assert float(cosines(got, torch.from_numpy(np.concatenate(want))).min()) > 0.9999


def test_torch_backend_skips_engines(tiny: LoadedEncoder, tmp_path: Path) -> None:
    plan = plan_inference(tiny, EmbeddingConfig(backend="torch", export_cache=tmp_path))
    assert plan.backend == "torch" and not (tmp_path / "encoders").exists()


def test_absent_gpu_is_an_error(tiny: LoadedEncoder) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        plan_inference(tiny, EmbeddingConfig(device="cuda"))


def test_engine_on_gpu_is_refused(tiny: LoadedEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, "resolve_device", lambda _name: torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="runs on the CPU"):
        plan_inference(tiny, EmbeddingConfig(device="cuda", backend="openvino"))


@pytest.mark.parametrize(
    ("free", "per_patch", "expected"),
    [(8 * 2**30, 40 * 2**20, 64), (80 * 2**30, 40 * 2**20, 512), (2**20, 2**30, 1)],
)
def test_gpu_batch_fits_half_the_free_memory(free: int, per_patch: int, expected: int) -> None:
    assert batch_for_memory(free, per_patch) == expected


def test_reader_threads_follow_the_device() -> None:
    from fedpath.client.embed.extract import reader_threads_for

    cfg = EmbeddingConfig()
    assert reader_threads_for(cfg, torch.device("cpu")) == cfg.reader_threads
    assert reader_threads_for(cfg, torch.device("cuda", 0)) >= cfg.reader_threads
    assert reader_threads_for(EmbeddingConfig(reader_threads=1), torch.device("cuda", 0)) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_cuda_plan_and_extraction(tiny: LoadedEncoder, slide: WsiReader) -> None:
    plan = plan_inference(tiny, EmbeddingConfig(device="cuda"))
    assert plan.device.startswith("cuda:") and plan.backend == "torch"
    runner = tiny.runners[planned_runner_key(plan.precision)]
    read = plan_read(slide.info.mpp, slide.info.level_downsamples, ResolutionConfig(patch_size=128))
    coords = _grid(slide, read)[:16]
    blocks: list[np.ndarray] = []
    cfg = EmbeddingConfig(device="cuda")
    extract_features(slide, coords, read, tiny, cfg, blocks.append, precision=plan.precision)
    cpu = load_encoder("tiny_cnn")
    want: list[np.ndarray] = []
    extract_features(slide, coords, read, cpu, EmbeddingConfig(), want.append, precision="float32")
    got = torch.from_numpy(np.concatenate(blocks))
    assert float(cosines(got, torch.from_numpy(np.concatenate(want))).mean()) > 0.999
    assert runner.device.type == "cuda"


def test_cpu_eager_runner_reports_cpu(tiny: LoadedEncoder) -> None:
    runner = get_runner(tiny, "float32", 4, jit=False, pixels=True)
    assert runner.device.type == "cpu"


def _one_slide_manifest(tmp_path: Path) -> Path:
    (tmp_path / "slides").mkdir()
    write_pyramid(tmp_path / "slides" / "tex.tif", _textured_image())
    manifest = tmp_path / "slides.csv"
    manifest.write_text("slide_id,path,label\ntex,slides/tex.tif,normal\n")
    return manifest


def test_prepare_cli_refuses_an_absent_gpu_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedpath.deploy.cli import EXIT_USAGE, main

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    out = tmp_path / "out"
    argv = ["prepare", "--manifest", str(_one_slide_manifest(tmp_path)), "--out", str(out)]
    code = main([*argv, "--encoder", "tiny_cnn", "--device", "cuda:0"])
    text = capsys.readouterr().out
    assert code == EXIT_USAGE
    assert "device 'cuda:0' asked for, but torch sees no CUDA GPU here" in text
    assert not list(out.rglob("*.h5")), "nothing embedded"


@pytest.mark.slow
def test_prepare_cli_reports_the_engine_it_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedpath.deploy.cli import EXIT_OK, main

    out = tmp_path / "out"
    argv = ["prepare", "--manifest", str(_one_slide_manifest(tmp_path)), "--out", str(out)]
    code = main([*argv, "--encoder", "tiny_cnn", "--backend", "onnx", "--patch-size", "64"])
    text = capsys.readouterr().out
    assert code == EXIT_OK, text
    assert "encoder ran as: onnx on cpu, float32, batch 8" in text
    assert list(out.rglob("tex.h5"))


@pytest.mark.slow
def test_foundation_architectures_run_on_every_engine(tmp_path: Path) -> None:
    """Each foundation entry's code path (reduced size, random weights) exports and agrees."""
    from fedpath.client.embed.foundation import FOUNDATION_MODELS
    from fedpath.client.embed.registry import EncoderSpec
    from tests.test_foundation_encoders import _random_model, _reduced

    for name, full in FOUNDATION_MODELS.items():
        entry = _reduced(full)
        spec = EncoderSpec(name, entry.input_size, entry.mean, entry.std, entry.feature_dim, "")
        encoder = LoadedEncoder(spec, _random_model(entry), f"random-{name}", None)
        images = calibration_images(spec, 3)
        reference = _reference(encoder, images)
        for engine in ("onnx", "openvino"):
            runner, _ = build_engine(engine, encoder, "float32", 2, tmp_path)
            worst = float(cosines(runner(images), reference).min())
            assert worst > 0.9999, f"{name} on {engine}: cosine {worst}"


@pytest.mark.parametrize(
    ("encoder", "mpp", "said"),
    [
        ("uni", 0.5, False),
        ("uni", 0.55, False),
        ("uni", 1.0, True),
        ("ctranspath", 0.5, True),
        ("efficientnet_lite0", 2.0, False),
        ("UNI2-h", 0.25, True),
    ],
)
def test_patches_at_another_scale_than_the_encoder_learnt_are_named(
    encoder: str, mpp: float, said: bool
) -> None:
    from fedpath.client.embed.catalog import resolution_mismatch

    note = resolution_mismatch(encoder, mpp)
    assert (note is not None) == said
    if note:
        assert f"cut at {mpp:g} µm/px" in note and "--target-mpp" in note


@pytest.mark.slow
def test_scale_note_reaches_the_prepare_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedpath.client.config import PrepareConfig
    from fedpath.client.embed import catalog
    from fedpath.client.prepare.pipeline import prepare_site

    seen: list[tuple[str, float]] = []

    def note(name: str, mpp: float) -> str:
        seen.append((name, mpp))
        return "tiny_cnn was trained on patches at 1 µm/px but patches are cut at 0.5 µm/px"

    monkeypatch.setattr(catalog, "resolution_mismatch", note)
    cfg = PrepareConfig.model_validate(
        {"embedding": {"encoder": "tiny_cnn", "backend": "torch"}, "write_qc": False}
    )
    summary = prepare_site(_one_slide_manifest(tmp_path), tmp_path / "out", cfg)
    assert seen == [("tiny_cnn", 0.5)]
    assert any("cut at 0.5 µm/px" in n for n in summary.inference_notes)


@pytest.mark.slow
def test_patch_only_says_embedding_flags_wait_for_the_embedding_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedpath.deploy.cli import EXIT_OK, main

    argv = ["prepare", "--manifest", str(_one_slide_manifest(tmp_path)), "--out", str(tmp_path)]
    code = main([*argv, "--patch-only", "--device", "cuda", "--encoder", "uni"])
    text = capsys.readouterr().out
    assert code == EXIT_OK, text
    assert "note: --encoder, --device apply when the patches are embedded" in text


@pytest.mark.slow
def test_prepare_stopped_by_sigterm_says_so_and_leaves_no_temporary(tmp_path: Path) -> None:
    """systemctl stop / docker stop send SIGTERM: the log says so, no half-written file stays."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fedpath.common.atomic import TMP_PREFIX

    (tmp_path / "slides").mkdir()
    write_pyramid(tmp_path / "slides" / "big.tif", _textured_image(4096, 4096))
    manifest = tmp_path / "slides.csv"
    manifest.write_text("slide_id,path,label\nbig,slides/big.tif,normal\n")
    out, log = tmp_path / "out", tmp_path / "prepare.log"
    argv = [sys.executable, "-m", "fedpath.deploy.cli", "prepare", "--manifest", str(manifest)]
    argv += ["--out", str(out), "--backend", "torch", "--patch-size", "64", "--batch-size", "1"]
    root = Path(__file__).resolve().parents[1]
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=root)
        deadline = time.monotonic() + 120
        while "patches to embed" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
    text = log.read_text()
    assert code == 128 + signal.SIGTERM, text
    assert "stopped (SIGTERM); finished items are kept, re-run to continue" in text
    assert "Traceback" not in text
    assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX)]
