"""Embedding benchmark: how close preparation gets to the encoder's own speed on this machine.

Usage (from the repository root)::

    .venv/bin/python bench/embedding.py            # full run, a few minutes
    .venv/bin/python bench/embedding.py --quick    # smaller slides, fewer repetitions

What it measures, for the default encoder (EfficientNet-Lite0), all in one run:

(a) Model-only throughput on random tensors (channels_last, ``torch.inference_mode()``, warm-up
    first): the hardware limit. Batch 64 in float32 and bfloat16, eager PyTorch (the baseline)
    and the traced/frozen graph the pipeline uses (``client.embed.extract.get_runner``); also
    the graph at the pipeline's batch size, and (full run) a batch-size sweep.
(b) End-to-end patches/s of ``client.prepare.pipeline.prepare_site`` on a synthetic slide
    (``client.wsi.synthetic.generate_slide``, cached under ``bench/_cache/embedding/``) with
    precision "auto", for two slide sizes. Each run is a subprocess, which reports its
    embedding-stage throughput (read → resize/normalise → encode → HDF5), its peak RSS and the
    RSS when extraction started, then measures model-only throughput itself at the same batch
    size and precision right afterwards (the machine is shared and noisy: comparing numbers
    taken seconds apart is more honest than comparing with the start of the run).

Printed ratios: pipeline efficiency = end-to-end / model-only (same precision and batch);
bf16 speed-up = bfloat16 graph / float32 eager at batch 64; bf16 feature cosine vs float32
(calibration batch, and the real NCT-CRC-HE tiles when ../shared/data is present); peak RSS per
slide size (flat in slide size when the pipeline streams). Targets: efficiency ≥ 0.9,
bf16 ≥ 3× the float32 eager baseline.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from client.config import EmbeddingConfig, PrepareConfig
from client.embed.extract import cpu_supports_bf16, get_runner, measure_bf16_cosine
from client.embed.registry import DEFAULT_ENCODER, LoadedEncoder, load_encoder

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / "_cache" / "embedding"
TILES = ROOT.parent / "shared" / "data" / "tiles" / "nct-crc-he"
MODEL_BATCH = 64
PIPELINE: dict[str, Any] = EmbeddingConfig().model_dump(
    include={"precision", "batch_size", "reader_threads", "queue_batches"}
)
"""What `fedpath prepare` ships with (EmbeddingConfig's defaults: auto precision, batch 8)."""
EXTRA_RUNS: tuple[dict[str, Any], ...] = (
    {**PIPELINE, "batch_size": 64, "queue_batches": 4},  # the design's batch 64, for contrast
    {**PIPELINE, "precision": "float32", "batch_size": 4},  # fastest measured here overall
)
"""Full run only, on the smaller slide: how the defaults and the float32 alternative compare."""


def _load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _timed_throughput(
    fn: Callable[[], object], batch: int, *, warmup: int, repeats: int
) -> tuple[float, float]:
    """(median, best) patches/s over ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(batch / (time.perf_counter() - start))
    return statistics.median(rates), max(rates)


def _random_batch(size: int, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 3, size, size), generator=gen)
    return x.contiguous(memory_format=torch.channels_last)


def _eager(encoder: LoadedEncoder, x: torch.Tensor, precision: str) -> Callable[[], object]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            if precision == "bfloat16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return encoder.model(x).float()
            return encoder.model(x)

    return run


def _random_pixels(size: int, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, size, size, 3), generator=gen, dtype=torch.uint8)
    return x.permute(0, 3, 1, 2)


def model_only(
    encoder: LoadedEncoder,
    precision: str,
    batch: int,
    *,
    jit: bool,
    repeats: int,
    pixels: bool = False,
) -> tuple[float, float]:
    """Model-only patches/s (median, best) on random input.

    The default is the encoder alone on a normalised float batch: the strict yardstick for the
    pipeline (which runs the same graph with the uint8 → float normalisation fused in front,
    ``pixels=True``, a few per cent slower on its own).
    """
    if jit:
        runner = get_runner(encoder, precision, batch, jit=True, pixels=pixels)
        size = encoder.spec.input_size
        x = _random_pixels(size, batch) if pixels else _random_batch(size, batch)
        return _timed_throughput(lambda: runner(x), batch, warmup=1, repeats=repeats)
    x = _random_batch(encoder.spec.input_size, batch)
    return _timed_throughput(_eager(encoder, x, precision), batch, warmup=2, repeats=repeats)


def real_tile_cosine(encoder: LoadedEncoder, batch: int) -> tuple[float, float] | None:
    """(mean, min) bf16-graph vs float32-eager cosine on the real NCT-CRC-HE tiles, if present."""
    import tifffile

    paths = sorted(TILES.glob("*.tif"))
    if not paths:
        return None
    images = np.stack([tifffile.imread(p)[..., :3] for p in paths]).astype(np.float32) / 255.0
    mean, std = np.asarray(encoder.spec.mean), np.asarray(encoder.spec.std)
    x = torch.from_numpy(((images - mean) / std).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.inference_mode():
        reference = encoder.model(x)
    got = get_runner(encoder, "bfloat16", batch, jit=True)(x)
    cos = torch.nn.functional.cosine_similarity(got.double(), reference.double(), dim=1)
    return float(cos.mean()), float(cos.min())


def read_path_throughput(manifest: Path, settings: dict[str, Any], limit: int) -> float:
    """Patches/s of the pipeline with a do-nothing encoder: reading, resizing, normalising.

    Reading and inference share the same cores, so the end-to-end rate cannot beat
    1 / (1/model + 1/read) unless the encoder leaves cores idle: this gives that bound.
    """
    from client.config import ResolutionConfig, TissueConfig
    from client.embed.extract import extract_features
    from client.embed.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec
    from client.wsi.patching import patch_grid
    from client.wsi.reader import WsiReader
    from client.wsi.resolution import plan_read
    from client.wsi.tissue import tissue_mask_for_slide

    with open(manifest, newline="") as fh:
        row = next(csv.DictReader(fh))
    spec = EncoderSpec("null", 224, IMAGENET_MEAN, IMAGENET_STD, 3, "channel means")
    null = LoadedEncoder(
        spec, torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), "-", None
    )
    cfg = EmbeddingConfig(
        batch_size=settings["batch_size"],
        reader_threads=settings["reader_threads"],
        queue_batches=settings["queue_batches"],
        jit=False,
    )
    with WsiReader(row["path"]) as reader:
        info = reader.info
        plan = plan_read(info.mpp, info.level_downsamples, ResolutionConfig())
        mask = tissue_mask_for_slide(reader, TissueConfig())
        grid = patch_grid(mask, info.dimensions, plan.patch_size_level0, plan.step_level0, 0.25)
        coords = grid.coords[:limit]
        stats = extract_features(
            reader, coords, plan, null, cfg, lambda block: None, precision="float32"
        )
    return stats.patches_per_second


# ------------------------------------------------------------------------ end-to-end child


class _RssEvents:
    """PrepareEvents that sample memory when extraction starts and after every batch."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.rss_at_extraction: int | None = None
        self.max_rss_in_extraction = 0

    def stage_started(self, stage: str, subject: str) -> None:
        return None

    def site_started(self, total_slides: int, encoder: str, precision: str) -> None:
        return None

    def slide_started(self, slide_id: str, num_patches: int) -> None:
        self.rss_at_extraction = self.process.memory_info().rss

    def patches_embedded(self, count: int) -> None:
        rss = self.process.memory_info().rss
        self.max_rss_in_extraction = max(self.max_rss_in_extraction, rss)

    def slide_finished(self, record: Any) -> None:
        return None


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes.

    Linux's VmHWM belongs to the address space, so it starts afresh at exec; ``ru_maxrss`` is
    inherited across fork+exec and would report the (larger) parent's peak instead.
    """
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One prepare_site run on one slide; returns throughput and memory figures."""
    from client.prepare.pipeline import prepare_site

    embedding = EmbeddingConfig(
        batch_size=spec["batch_size"],
        reader_threads=spec["reader_threads"],
        queue_batches=spec["queue_batches"],
        precision=spec["precision"],
    )
    cfg = PrepareConfig(embedding=embedding)
    events = _RssEvents()
    with tempfile.TemporaryDirectory(dir=CACHE) as out:
        summary = prepare_site(Path(spec["manifest"]), Path(out), cfg, events=events)
        peak = _peak_rss()
    record = summary.records[0]
    if record.state != "done":
        raise RuntimeError(f"prepare failed: {record.stage}: {record.reason}")
    encoder = load_encoder(DEFAULT_ENCODER)
    model_median, model_best = model_only(
        encoder, summary.precision, spec["batch_size"], jit=True, repeats=spec["repeats"]
    )
    return {
        "patches": record.num_patches,
        "embed_seconds": record.seconds["embedding"],
        "site_seconds": summary.seconds,
        "precision": summary.precision,
        "bf16_cosine": summary.bf16_cosine,
        "peak_rss": peak,
        "rss_at_extraction": events.rss_at_extraction,
        "max_rss_in_extraction": events.max_rss_in_extraction,
        "model_only": model_median,
        "model_only_best": model_best,
    }


def synthetic_manifest(side: int) -> Path:
    """A one-slide manifest for a cached synthetic slide of ``side``×``side`` level-0 px."""
    from client.wsi.synthetic import SynthSlideConfig, generate_slide

    slide_id = f"synth-{side}"
    directory = CACHE / slide_id
    manifest = directory / "slides.csv"
    if manifest.is_file():
        return manifest
    cfg = SynthSlideConfig(width_px=side, height_px=side, tumour_fraction=0.3, annotate=False)
    slide = generate_slide(directory, slide_id, cfg, seed=side)
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "path", "label"])
        writer.writerow([slide_id, str(slide.slide_path), slide.label])
    return manifest


def run_child(manifest: Path, settings: dict[str, Any], repeats: int) -> dict[str, Any]:
    spec = {"manifest": str(manifest), "repeats": repeats, **settings}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- main


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def main(quick: bool) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    repeats = 3 if quick else 5
    sizes = (8192, 12288) if quick else (8192, 16384)
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
        names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
    print("# fedpath embedding benchmark" + (" (quick)" if quick else ""))
    print(
        f"machine: {names[0] if names else cpu}, {os.cpu_count()} vCPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"native bf16: {cpu_supports_bf16()}, load average {_load_average()}"
    )

    encoder = load_encoder(DEFAULT_ENCODER)
    print(
        f"encoder: {encoder.spec.id} (sha256 {encoder.weights_sha256[:12]}…), "
        f"{encoder.spec.input_size} px → {encoder.spec.feature_dim}-d"
    )

    print("\n## (a) model only, random tensors, channels_last, inference_mode [patches/s]")
    rows: dict[tuple[str, str, int], tuple[float, float]] = {}
    small = PIPELINE["batch_size"]
    plan = [
        ("eager", "float32", MODEL_BATCH),
        ("eager", "bfloat16", MODEL_BATCH),
        ("graph", "float32", MODEL_BATCH),
        ("graph", "bfloat16", MODEL_BATCH),
        ("graph", "bfloat16", small),
        ("graph", "float32", 4),
    ]
    pixel_plan = [("graph+u8", "bfloat16", small)]
    if not quick:
        plan += [("eager", "float32", 4), ("graph", "float32", 1), ("graph", "bfloat16", 1)]
    print(f"{'mode':<6} {'precision':<9} {'batch':>5} {'median':>8} {'best':>8}")
    for mode, precision, batch in plan:
        result = model_only(encoder, precision, batch, jit=mode == "graph", repeats=repeats)
        rows[(mode, precision, batch)] = result
        print(f"{mode:<6} {precision:<9} {batch:>5} {result[0]:>8.1f} {result[1]:>8.1f}")
    for mode, precision, batch in pixel_plan:
        result = model_only(encoder, precision, batch, jit=True, repeats=repeats, pixels=True)
        rows[(mode, precision, batch)] = result
        print(
            f"{mode:<6} {precision:<9} {batch:>5} {result[0]:>8.1f} {result[1]:>8.1f}  "
            f"(the pipeline's graph: uint8 in, normalisation fused; the yardstick below is "
            f"the encoder alone, row 'graph')"
        )
    baseline = rows[("eager", "float32", MODEL_BATCH)][0]

    def ratio(mode: str, precision: str, batch: int) -> str:
        return f"{rows[(mode, precision, batch)][0] / baseline:.2f}×"

    print(
        f"speed-up vs the float32 eager baseline (batch {MODEL_BATCH}): "
        f"bf16 eager {ratio('eager', 'bfloat16', MODEL_BATCH)}, "
        f"bf16 graph {ratio('graph', 'bfloat16', MODEL_BATCH)}, "
        f"bf16 graph at batch {small} {ratio('graph', 'bfloat16', small)} (target ≥ 3×); "
        f"float32 graph at batch 4 {ratio('graph', 'float32', 4)}"
    )

    print("\n## bf16 features vs float32 (cosine similarity per patch)")
    mean_cos, min_cos = measure_bf16_cosine(
        encoder, EmbeddingConfig(batch_size=PIPELINE["batch_size"])
    )
    print(f"calibration batch (synthetic H&E): mean {mean_cos:.5f}, min {min_cos:.5f}")
    tiles = real_tile_cosine(encoder, PIPELINE["batch_size"])
    if tiles is None:
        print(f"real tiles: not found at {TILES}")
    else:
        print(f"real NCT-CRC-HE tiles: mean {tiles[0]:.5f}, min {tiles[1]:.5f}")

    print("\n## (b) end to end: prepare_site on a synthetic slide, precision auto")
    runs = [(side, PIPELINE) for side in sizes]
    if not quick:
        runs += [(sizes[0], extra) for extra in EXTRA_RUNS]
    results = [(side, st, run_child(synthetic_manifest(side), st, repeats)) for side, st in runs]
    print(
        "embed p/s: embedding stage (read, resize, normalise, encode, write HDF5); model p/s: "
        "model only, same process, precision and batch, measured right after; RSS in "
        "extraction: RSS when extraction started → highest RSS sampled after each batch; "
        "peak: the child's whole-run peak (VmHWM: encoder, calibration, tissue, QC included)"
    )
    print(
        f"{'slide':>12} {'asked':>7} {'batch':>5} {'patches':>7} {'used':>8} {'embed p/s':>9} "
        f"{'model p/s':>9} {'efficiency':>10} {'RSS in extraction':>21} {'peak':>9}"
    )
    for side, setting, r in results:
        e2e = r["patches"] / r["embed_seconds"]
        in_extraction = f"{_mib(r['rss_at_extraction'])} → {_mib(r['max_rss_in_extraction'])}"
        print(
            f"{side:>5}×{side:<6} {setting['precision']:>7} {setting['batch_size']:>5} "
            f"{r['patches']:>7} {r['precision']:>8} {e2e:>9.1f} {r['model_only']:>9.1f} "
            f"{e2e / r['model_only']:>10.3f} {in_extraction:>21} {_mib(r['peak_rss']):>9}"
        )
    for side, setting, r in results:
        if setting is PIPELINE:
            print(
                f"  {side}²: whole prepare_site {r['patches'] / r['site_seconds']:.1f} patches/s "
                f"({r['site_seconds']:.1f} s incl. encoder load and bf16 calibration)"
            )
    tuned = [(side, r) for side, setting, r in results if setting is PIPELINE]
    (small_side, lo), (large_side, hi) = tuned[0], tuned[-1]
    efficiency = min(r["patches"] / r["embed_seconds"] / r["model_only"] for _, r in tuned)
    print(
        f"\npipeline efficiency (end-to-end / model-only, same precision and batch): "
        f"{efficiency:.3f} worst of the two sizes (target ≥ 0.9)"
    )
    read_rate = read_path_throughput(synthetic_manifest(sizes[0]), PIPELINE, 1024)
    model_rate = statistics.median(r["model_only"] for _, r in tuned)
    print(
        f"read path alone (same pipeline, do-nothing encoder): {read_rate:.0f} patches/s; "
        f"reading and inference share {os.cpu_count()} vCPUs, so end-to-end ≤ "
        f"1/(1/{model_rate:.0f} + 1/{read_rate:.0f}) = "
        f"{1 / (1 / model_rate + 1 / read_rate):.0f} patches/s, efficiency ≤ "
        f"{read_rate / (read_rate + model_rate):.2f} unless the encoder leaves a core idle"
    )
    for what, key in (("max RSS in extraction", "max_rss_in_extraction"), ("peak RSS", "peak_rss")):
        print(
            f"{what}: {_mib(lo[key])} for {lo['patches']} patches ({small_side}²), "
            f"{_mib(hi[key])} for {hi['patches']} patches ({large_side}²): "
            f"×{hi[key] / lo[key]:.2f} for ×{hi['patches'] / lo['patches']:.1f} patches"
        )
    print(f"load average at the end: {_load_average()}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        main(quick="--quick" in sys.argv[1:])
