"""``fedpath prepare`` in a log (issue 21, point 6).

When stdout is not a terminal (systemd, nohup, docker logs, ``> log``) a run writes plain
lines: one when a slide starts and one when it ends, a heartbeat at least every 30 s with
patches done / total, rate and ETA (or the step still running), one unwrapped line per failure,
and no escape code, carriage return or table. The 30 s are tested with an injected clock.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress

from fedpath.client.prepare.records import PrepareSummary, SlideRecord
from fedpath.client.progress import (
    LogPrepareEvents,
    LogProgress,
    RichPrepareEvents,
    bar_or_lines,
    duration,
    prepare_events,
    print_summary,
)
from fedpath.deploy.cli import EXIT_PARTIAL, main
from fedpath.synthetic.slides import SynthSlideConfig, generate_slide

ROOT = Path(__file__).resolve().parents[1]
ESCAPES = re.compile(r"\x1b|\r")
BOX = re.compile("[━─│┃┏┓┗┛┡┩╇]")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _reporter() -> tuple[LogPrepareEvents, list[str], FakeClock]:
    lines: list[str] = []
    clock = FakeClock()
    return LogPrepareEvents(lines.append, clock=clock, poll=None), lines, clock


def _done(slide_id: str, patches: int, seconds: float) -> SlideRecord:
    return SlideRecord(
        slide_id=slide_id,
        state="done",
        num_patches=patches,
        seconds={"tissue": 2.0, "embedding": seconds - 2.0},
        mpp=0.25,
        mpp_source="openslide",
    )


def test_a_long_slide_writes_a_line_every_30_s_with_rate_and_eta() -> None:
    events, lines, clock = _reporter()
    events.stage_started("encoder", "uni")
    events.site_started(2, "uni", "float32")
    events.stage_started("tissue", "s1")
    clock.now += 5
    events.slide_started("s1", 20000)
    assert lines == [
        "loading encoder uni",
        "encoder uni (float32); 2 slide(s) to prepare",
        "slide 1/2 s1: segmenting tissue and placing patches",
        "slide 1/2 s1: started, 20000 patches to embed",
    ]
    # 200 patches every 10 s (20 patches/s) for 100 s: a line at 30, 60 and 90 s, no more.
    for _ in range(10):
        clock.now += 10
        events.patches_embedded(200)
    beats = lines[4:]
    assert beats == [
        "slide 1/2 s1: 600/20000 patches (3%), 20.0 patches/s, ETA 16 min 10 s",
        "slide 1/2 s1: 1200/20000 patches (6%), 20.0 patches/s, ETA 15 min 40 s",
        "slide 1/2 s1: 1800/20000 patches (9%), 20.0 patches/s, ETA 15 min 10 s",
    ]
    events.stage_started("outputs", "s1")
    events.slide_finished(_done("s1", 20000, 1002.0))
    # one slide of two is left: at this slide's pace, about as long again
    assert lines[-1] == (
        "done s1: 20000 patches in 1002.0 s, 20.0 patches/s, 0.250 µm/px (openslide); "
        "1/2 slides, about 16 min 42 s left at this pace"
    )
    events.slide_finished(_done("s2", 100, 10.0))
    assert lines[-1] == "done s2: 100 patches in 10.0 s, 10.0 patches/s, 0.250 µm/px (openslide)"


def test_a_site_of_fast_slides_says_less_than_a_second_is_left() -> None:
    events, lines, _ = _reporter()
    events.site_started(3, "tiny_cnn", "float32")
    quick = SlideRecord(slide_id="s1", state="done", num_patches=3, seconds={"embedding": 0.3})
    events.slide_finished(quick)  # 2 slides left at 0.3 s each
    assert lines[-1].endswith("; 1/3 slides, less than a second left at this pace"), lines
    events.slide_finished(_done("s2", 30, 4.7))  # mean (0.3 + 4.7) / 2 s for the last one
    assert lines[-1].endswith("; 2/3 slides, about 2 s left at this pace"), lines


def test_a_silent_step_gets_a_heartbeat_naming_it() -> None:
    events, lines, clock = _reporter()
    events.stage_started("encoder", "virchow2")
    clock.now += 29
    events.tick()
    assert lines == ["loading encoder virchow2"]  # not yet 30 s
    clock.now += 2
    events.tick()
    assert lines[-1] == "still loading encoder after 31 s"
    events.stage_started("inference plan", "virchow2")  # exports and measures on first use
    assert lines[-1].startswith("planning how virchow2 runs: device, precision, engine")
    clock.now += 40
    events.tick()
    assert lines[-1] == "still planning how the encoder runs after 40 s"
    events.site_started(1, "virchow2", "bfloat16")
    events.stage_started("tissue", "big")
    clock.now += 95
    events.tick()
    assert (
        lines[-1] == "slide 1/1 big: still segmenting tissue and placing patches after 1 min 35 s"
    )
    events.slide_started("big", 100000)
    clock.now += 45
    events.tick()  # an export or one huge first batch: no batch has finished
    assert lines[-1] == "slide 1/1 big: 0/100000 patches after 45 s, no batch finished yet"


def test_failures_and_reuses_are_one_line_each_with_the_existing_wording() -> None:
    events, lines, _ = _reporter()
    events.site_started(3, "tiny_cnn", "float32")
    reason = (
        "/data/hospital/slides/a/very/long/path/s2.svs is not a slide format OpenSlide can read"
    )
    events.slide_finished(SlideRecord(slide_id="s2", state="failed", stage="open", reason=reason))
    events.slide_finished(SlideRecord(slide_id="s3", state="reused", num_patches=7))
    assert lines[1:] == [
        f"failed s2 (at open): {reason}",
        "reused s3: 7 patches, already prepared with these settings",
    ]


def test_the_heartbeat_thread_covers_a_step_that_reports_nothing() -> None:
    lines: list[str] = []
    with LogPrepareEvents(lines.append, interval=0.05, poll=0.01) as events:
        events.stage_started("encoder", "uni2_h")
        deadline = time.monotonic() + 5
        while len(lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert lines[0] == "loading encoder uni2_h"
    assert lines[1].startswith("still loading encoder after ")


def test_duration_reads_at_a_glance() -> None:
    assert [duration(s) for s in (0, 59.4, 61, 3599, 3600 * 3 + 125)] == [
        "0 s",
        "59 s",
        "1 min 01 s",
        "59 min 59 s",
        "3 h 02 min",
    ]


def test_a_log_gets_lines_and_a_terminal_gets_bars() -> None:
    log = Console(file=io.StringIO(), width=80)
    with prepare_events(log) as events:
        assert isinstance(events, LogPrepareEvents)
    tty = Console(file=io.StringIO(), width=80, force_terminal=True)
    with prepare_events(tty) as events:
        assert isinstance(events, RichPrepareEvents)


def _summary(records: tuple[SlideRecord, ...]) -> PrepareSummary:
    return PrepareSummary(
        out_dir=Path("/out"),
        records=records,
        encoder="tiny_cnn",
        precision="float32",
        bf16_cosine=None,
        seconds=3.0,
        embed_seconds=2.0,
    )


def test_the_summary_prints_each_reason_whole_on_one_line_at_80_columns() -> None:
    reason = (
        "annotation /data/hospital/annotations/s2.geojson: no tumour region on a tumour slide: "
        'classes found "Stroma" (3); tumour classes are Tumor, Tumour'
    )
    summary = _summary(
        (
            SlideRecord(slide_id="s2", state="failed", stage="annotation", reason=reason),
            SlideRecord(slide_id="s1", state="done", num_patches=4, reason="1 Point ignored"),
        )
    )
    for terminal in (True, False):
        console = Console(file=io.StringIO(), width=80, force_terminal=terminal)
        print_summary(console, summary)
        text = console.file.getvalue()  # type: ignore[attr-defined]
        plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
        assert f"failed s2 (at annotation): {reason}" in plain.splitlines()
        assert "note s1: 1 Point ignored" in plain.splitlines()
        # the table is for a person at a terminal; a log has had a line per slide already
        assert bool(BOX.search(text)) is terminal


def _site(root: Path) -> Path:
    """One good synthetic slide, one file that is not a slide, one row naming no file."""
    generate_slide(root, "good", SynthSlideConfig(width_px=1024, height_px=1024), 0)
    (root / "slides" / "bad.svs").write_text("not a slide")
    manifest = root / "slides.csv"
    manifest.write_text(
        "slide_id,path,label\n"
        "good,slides/good.tiff,normal\n"
        "bad,slides/bad.svs,normal\n"
        "gone,slides/gone.svs,normal\n"
    )
    return manifest


def _assert_log(text: str, manifest: Path) -> None:
    assert not ESCAPES.search(text), repr(text)
    assert not BOX.search(text), text  # no table, no bar
    lines = text.splitlines()
    bad = manifest.parent / "slides" / "bad.svs"
    failed_bad = (
        f"failed bad (at open): {bad} is not a slide format OpenSlide can read "
        "(Unsupported or missing image file)"
    )
    gone = manifest.parent / "slides" / "gone.svs"
    failed_gone = f"failed gone (at manifest): line 4 (gone): slide file not found: {gone}"
    # each failure is one whole line, when it happens and again at the end
    assert lines.count(failed_bad) == 2, text
    assert lines.count(failed_gone) == 2, text
    assert "loading encoder tiny_cnn" in lines
    assert any(line.startswith("planning how tiny_cnn runs: ") for line in lines), text
    assert "slide 2/3 good: segmenting tissue and placing patches" in lines
    started = [line for line in lines if line.startswith("slide 2/3 good: started, ")]
    assert started and started[0].endswith(" patches to embed")
    done = [line for line in lines if line.startswith("done good: ")]
    assert len(done) == 1 and re.search(r" patches in [0-9.]+ s, [0-9.]+ patches/s", done[0])
    # the totals and the pointer to the status files are whole lines, not wrapped at 80
    totals = next(line for line in lines if line.startswith("1 done, 0 reused, 2 failed; "))
    assert re.search(r" \(tiny_cnn, float32\); [0-9.]+ s$", totals), totals
    status = manifest.parent.parent / "out" / "status"
    assert any(f"; see the reasons above and {status}. Fix them" in line for line in lines)


@pytest.mark.slow
@pytest.mark.integration
def test_prepare_writes_plain_lines_when_stdout_is_not_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    manifest = _site(tmp_path / "site")
    argv = ["prepare", "--manifest", str(manifest), "--out", str(tmp_path / "out")]
    code = main([*argv, "--encoder", "tiny_cnn", "--tissue-preset", "biopsy"])
    assert code == EXIT_PARTIAL
    _assert_log(capsys.readouterr().out, manifest)


@pytest.mark.slow
@pytest.mark.integration
def test_prepare_redirected_to_a_file_is_a_readable_log(tmp_path: Path) -> None:
    manifest = _site(tmp_path / "site")
    log = tmp_path / "prepare.log"
    command = [sys.executable, "-m", "fedpath.deploy.cli", "prepare", "--manifest", str(manifest)]
    command += ["--out", str(tmp_path / "out"), "--encoder", "tiny_cnn"]
    command += ["--tissue-preset", "biopsy"]
    env = {**os.environ, "COLUMNS": "80", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("FORCE_COLOR", None)
    env.pop("TTY_COMPATIBLE", None)
    with log.open("w", encoding="utf-8") as fh:
        done = subprocess.run(
            command, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=300
        )
    text = log.read_text(encoding="utf-8")
    assert done.returncode == EXIT_PARTIAL, text
    _assert_log(text, manifest)


def test_log_progress_writes_a_line_per_step_with_a_status() -> None:
    clock = FakeClock()
    console = Console(file=io.StringIO(), width=80)
    progress = LogProgress(console, clock=clock, poll=None)
    with progress:
        task = progress.add_task("epochs", total=3, status="")
        for epoch in range(3):
            clock.now += 12
            progress.update(task, advance=1, status=f"loss 0.{5 - epoch}000 val n/a")
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert text.splitlines() == [
        "epochs 1/3: loss 0.5000 val n/a (12 s)",
        "epochs 2/3: loss 0.4000 val n/a (24 s)",
        "epochs 3/3: loss 0.3000 val n/a (36 s)",
    ]


def test_log_progress_without_a_status_writes_every_30_s_and_at_the_end() -> None:
    clock = FakeClock()
    console = Console(file=io.StringIO(), width=80)
    progress = LogProgress(console, clock=clock, poll=None)
    task = progress.add_task("synthesising 3 sites", total=20)
    for _ in range(20):
        clock.now += 4
        progress.advance(task)
    progress.update(task, completed=20)  # nothing new: no line
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert lines == [
        "synthesising 3 sites 8/20 (32 s)",
        "synthesising 3 sites 16/20 (1 min 04 s)",
        "synthesising 3 sites 20/20 (1 min 20 s)",
    ]


def test_log_progress_says_a_long_step_is_still_running() -> None:
    clock = FakeClock()
    console = Console(file=io.StringIO(), width=80)
    progress = LogProgress(console, clock=clock, poll=None)
    task = progress.add_task("epochs", total=10, status="")
    clock.now += 20
    progress.update(task, advance=1, status="loss 0.5000")
    for _ in range(5):  # the second epoch takes 100 s: a line 40 s and 80 s into it
        clock.now += 20
        progress.tick()
    progress.update(task, advance=1, status="loss 0.4000")
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert lines == [
        "epochs 1/10: loss 0.5000 (20 s)",
        "epochs 1/10: still running (1 min 00 s)",
        "epochs 1/10: still running (1 min 40 s)",
        "epochs 2/10: loss 0.4000 (2 min 00 s)",
    ]


def test_log_progress_heartbeat_thread_runs_while_the_caller_is_busy() -> None:
    console = Console(file=io.StringIO(), width=80)
    with LogProgress(console, interval=0.05, poll=0.01) as progress:
        progress.add_task("federated rounds", total=3, status="round 1 running")
        deadline = time.monotonic() + 5
        while "still running" not in console.file.getvalue() and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
    assert "federated rounds 0/3: still running (" in console.file.getvalue()  # type: ignore[attr-defined]


def test_bar_or_lines_follows_the_console() -> None:
    assert isinstance(bar_or_lines(Console(file=io.StringIO())), LogProgress)
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(bar_or_lines(terminal), Progress)


@pytest.mark.integration
def test_local_train_in_a_log_writes_a_line_per_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_cli_local import _make_site

    data, run = tmp_path / "site", tmp_path / "run"
    _make_site(data)
    argv = ["local", "train", "--data", str(data), "--out", str(run)]
    argv += ["--config", str(data / "train.toml"), "--epochs", "3"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert not ESCAPES.search(text) and not BOX.search(text), text
    epochs = [line for line in text.splitlines() if line.startswith("epochs ")]
    assert [line.split(":")[0] for line in epochs] == ["epochs 1/3", "epochs 2/3", "epochs 3/3"]
    assert all(" loss " in line and " auc " in line for line in epochs), epochs


def test_a_terminal_keeps_its_bars_through_every_event() -> None:
    console = Console(file=io.StringIO(), width=80, force_terminal=True)
    with RichPrepareEvents(console) as events:
        events.stage_started("encoder", "tiny_cnn")
        events.site_started(2, "tiny_cnn", "float32")
        events.stage_started("tissue", "s1")
        events.slide_started("s1", 10)
        events.patches_embedded(10)
        events.stage_started("outputs", "s1")
        events.slide_finished(_done("s1", 10, 3.0))
        events.slide_finished(
            SlideRecord(slide_id="s2", state="failed", stage="tissue", reason="no tissue found")
        )
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", console.file.getvalue())  # type: ignore[attr-defined]
    assert "loading encoder tiny_cnn" in text and "encoder tiny_cnn (float32)" in text
    assert "failed s2 (at tissue): no tissue found" in text
    assert "━" in text  # the bars are drawn
    assert "s1: segmenting tissue and placing patches" in text and " 0/? " in text
    # the last frame holds the slides bar only: the last slide's bar does not linger
    last = [line for line in re.split(r"[\r\n]+", text) if line.strip()][-1]
    assert last.startswith("slides ") and " 2/2 " in last, last


@pytest.mark.slow
@pytest.mark.integration
def test_a_real_run_reports_every_patch_it_embeds(tmp_path: Path) -> None:
    """The heartbeat's counts come from the pipeline's own callbacks: with no interval every
    batch gives a line, and the last one has embedded all the slide's patches."""
    from fedpath.client.config import EmbeddingConfig, PrepareConfig, TissueConfig
    from fedpath.client.prepare.pipeline import prepare_site

    manifest = _site(tmp_path / "site")
    cfg = PrepareConfig(
        embedding=EmbeddingConfig(encoder="tiny_cnn", batch_size=8, backend="torch"),
        tissue=TissueConfig.preset("biopsy"),
    )
    lines: list[str] = []
    with LogPrepareEvents(lines.append, interval=0.0, poll=None) as events:
        summary = prepare_site(manifest, tmp_path / "out", cfg, events=events)
    good = next(r for r in summary.records if r.slide_id == "good")
    total = good.num_patches
    assert total > 8
    beat = re.compile(rf"slide 2/3 good: (\d+)/{total} patches \(\d+%\), [0-9.]+ patches/s, ETA ")
    counts = [int(m.group(1)) for m in map(beat.match, lines) if m]
    assert len(counts) > 1 and counts == sorted(counts) and counts[-1] == total, lines


def test_a_skipped_bag_is_printed_as_text_on_one_line() -> None:
    """``local train/eval`` printed a skip's reason as rich markup: "[annotation]" or a
    bracketed folder name vanished from the message, and a long path wrapped in a log."""
    from fedpath.client.cli_local import _bag_skips
    from fedpath.client.training.bags import SkippedBag
    from fedpath.client.training.site_index import BagEntry
    from fedpath.common.errors import FeatureBagError

    path = "/data/hospital [site a]/features/a_rather_long_folder_name/s1.h5"
    entry = BagEntry("s1", 1, Path(path), "train", None, False, None, 10)
    console = Console(file=io.StringIO(), width=80)
    _bag_skips(console)(SkippedBag(entry, FeatureBagError(path, "see [annotation] settings")))
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert lines == [f"s1 skipped: feature file {path}: see [annotation] settings"]


def test_the_demo_site_prefix_survives_on_a_terminal() -> None:
    """``[site_a]`` was rich markup: the demo's lines lost the site they came from."""
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None)
    with RichPrepareEvents(console, "site_a") as events:
        events.site_started(1, "tiny_cnn", "float32")
        events.slide_finished(
            SlideRecord(slide_id="s2", state="failed", stage="tissue", reason="no tissue found")
        )
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", console.file.getvalue())  # type: ignore[attr-defined]
    assert "[site_a] encoder tiny_cnn (float32)" in text
    assert "[site_a] failed s2 (at tissue): no tissue found" in text
    assert "[site_a] slides" in text


REAL_SLIDE = ROOT.parent / "shared" / "data" / "slides" / "cmu-1-small-region.svs"


@pytest.mark.slow
@pytest.mark.integration
def test_a_real_aperio_slide_prepared_into_a_log(tmp_path: Path) -> None:
    if not REAL_SLIDE.is_file():
        pytest.skip(f"real test slide not present ({REAL_SLIDE}); see ../shared/data/README.md")
    site = tmp_path / "site"
    (site / "slides").mkdir(parents=True)
    (site / "slides" / REAL_SLIDE.name).write_bytes(REAL_SLIDE.read_bytes())
    manifest = site / "slides.csv"
    manifest.write_text(f"slide_id,path,label\ncmu,slides/{REAL_SLIDE.name},normal\n")
    command = [sys.executable, "-m", "fedpath.deploy.cli", "prepare", "--manifest", str(manifest)]
    command += ["--out", str(tmp_path / "out"), "--encoder", "tiny_cnn"]
    env = {**os.environ, "COLUMNS": "80", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("FORCE_COLOR", None)
    env.pop("TTY_COMPATIBLE", None)
    log = tmp_path / "prepare.log"
    with log.open("w", encoding="utf-8") as fh:
        done = subprocess.run(
            command, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=300
        )
    text = log.read_text(encoding="utf-8")
    assert done.returncode == 0, text
    assert not ESCAPES.search(text) and not BOX.search(text), text
    lines = text.splitlines()
    assert "slide 1/1 cmu: segmenting tissue and placing patches" in lines, text
    started = next(line for line in lines if line.startswith("slide 1/1 cmu: started, "))
    total = int(started.split(", ")[1].split()[0])
    finished = next(line for line in lines if line.startswith("done cmu: "))
    assert finished.startswith(f"done cmu: {total} patches in "), finished
    assert finished.endswith(", 0.499 µm/px (slide)"), finished  # the scanner's own MPP


@pytest.mark.slow
@pytest.mark.integration
def test_the_demo_says_which_hospital_its_totals_are_of(tmp_path: Path) -> None:
    """The demo printed each hospital's totals without its name, folded at 80 columns."""
    import argparse

    from fedpath.deploy.cli_demo import _prepare_sites

    def one_site(args: argparse.Namespace, out: Path, console: Console) -> list[Path]:
        site = out / "site_q"
        generate_slide(site, "q1", SynthSlideConfig(width_px=1024, height_px=1024), 0)
        (site / "slides.csv").write_text(
            "slide_id,path,label,split\nq1,slides/q1.tiff,normal,test\n"
        )
        return [site]

    args = argparse.Namespace(tissue_preset=None, config=None, out=tmp_path)
    console = Console(file=io.StringIO(), width=80)
    overrides = {"embedding": {"encoder": "tiny_cnn", "backend": "torch"}}
    prepared, failed = _prepare_sites(args, console, lambda _: overrides, one_site, {})
    assert failed == 0 and set(prepared) == {"site_q"}
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    totals = [line for line in lines if " done, 0 reused, 0 failed; " in line]
    assert len(totals) == 1 and totals[0].startswith("[site_q] 1 done, "), lines
    assert totals[0].endswith(" s") and "(tiny_cnn, float32)" in totals[0], totals
    ran = [line for line in lines if "encoder ran as:" in line]
    assert ran == ["[site_q] encoder ran as: torch on cpu, float32, batch 8, 2 reader thread(s)"]


@pytest.mark.integration
def test_heatmaps_print_a_manifest_problem_as_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest problem quoting "[annotation]" lost it (rich markup) in local heatmaps."""
    from tests.test_cli_local import _make_site

    data, run = tmp_path / "site", tmp_path / "run"
    _make_site(data)
    train = ["local", "train", "--data", str(data), "--out", str(run)]
    assert main([*train, "--config", str(data / "train.toml"), "--epochs", "1"]) == 0
    # a path longer than the 80-column console: it must stay whole to be copied
    manifest = tmp_path / ("hospital-" * 8) / "slides.csv"
    manifest.parent.mkdir()
    manifest.write_text(
        "slide_id,path,label\ns13,s13.svs,tumour\ns12,s12.svs,tumour [annotation]\n"
    )
    capsys.readouterr()
    argv = ["local", "heatmaps", "--data", str(data), "--run", str(run)]
    main([*argv, "--manifest", str(manifest), "--out", str(tmp_path / "hm")])
    out = " ".join(capsys.readouterr().out.split())
    assert f"manifest {manifest}: line 3 (s12): unknown label 'tumour [annotation]'" in out, out


def test_an_encoder_path_with_brackets_is_printed_whole_on_a_terminal() -> None:
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None)
    with RichPrepareEvents(console) as events:
        events.site_started(0, "/models/[v2]/encoder.pt", "float32")
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", console.file.getvalue())  # type: ignore[attr-defined]
    assert "encoder /models/[v2]/encoder.pt (float32)" in text, text
