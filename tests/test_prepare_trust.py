"""What ``fedpath prepare`` reports is true (issue 20, points 2-4).

- a slide whose content changed is prepared again even when its size and mtime were kept, and
  an unchanged, copied or touched slide is reused without re-embedding;
- a rerun keeps the status record of the run that did the work and says what it did apart;
- a write the system refuses fails that slide (or the site files) with one message naming the
  file and the OS error, exit code 1, no temporary left, never a libhdf5 crash. The failures
  are real: a file-size limit (``RLIMIT_FSIZE``) on the ``fedpath prepare`` process, an
  immutable directory (``chattr +i``: refuses writes to root too, which ``chmod`` does not),
  and a directory standing where an output file must go.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fedpath.client.config import EmbeddingConfig, PrepareConfig
from fedpath.client.prepare import fingerprint as fingerprint_module
from fedpath.client.prepare.pipeline import prepare_site
from fedpath.common.atomic import TMP_PREFIX
from fedpath.common.featurebag import read_attrs, read_feature_bag
from fedpath.synthetic.slides import SynthSlide, SynthSlideConfig, generate_slide

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TINY = PrepareConfig(embedding=EmbeddingConfig(encoder="tiny_cnn", batch_size=32))


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SynthSlide]]:
    root = tmp_path_factory.mktemp("slides")
    made = [
        generate_slide(
            root, f"s{i}", SynthSlideConfig(width_px=3072, height_px=2560, annotate=False), i
        )
        for i in (1, 2)
    ]
    return root, made


def _site(tmp_path: Path, slides: tuple[Path, list[SynthSlide]]) -> tuple[Path, list[Path]]:
    """A private copy of the slides (tests change them) and its manifest."""
    source_root, made = slides
    site = tmp_path / "site"
    (site / "slides").mkdir(parents=True)
    paths = []
    for slide in made:
        target = site / "slides" / slide.slide_path.name
        shutil.copy2(slide.slide_path, target)
        paths.append(target)
    del source_root
    _manifest(site, paths)
    return site, paths


def _manifest(site: Path, paths: list[Path]) -> Path:
    rows = "".join(
        f"{p.stem},{p.relative_to(site)},{'tumour' if i == 0 else 'normal'}\n"
        for i, p in enumerate(paths)
    )
    manifest = site / "slides.csv"
    manifest.write_text("slide_id,path,label\n" + rows)
    return manifest


class _SampleCounter:
    """Counts the sampled content hashes computed (the fast path reads no slide bytes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = fingerprint_module.sha256_sampled

        def counted(path: str | os.PathLike[str]) -> str:
            self.calls += 1
            return real(path)

        monkeypatch.setattr(fingerprint_module, "sha256_sampled", counted)


# ---------------------------------------------------------------- 2: changed slides


@pytest.mark.slow
def test_a_slide_changed_with_size_and_mtime_kept_is_prepared_again(
    tmp_path: Path, slides: tuple[Path, list[SynthSlide]]
) -> None:
    site, paths = _site(tmp_path, slides)
    out = tmp_path / "out"
    first = prepare_site(site / "slides.csv", out, TINY)
    assert [r.state for r in first.records] == ["done", "done"]
    before = read_feature_bag(out / "features" / "tiny_cnn" / "s1.h5")

    # A restore of another version: same size, same mtime (put back as `touch -r` does).
    changed = paths[0]
    stat = changed.stat()
    data = changed.read_bytes()
    assert data.count(b"MPP = 0.5") >= 1
    changed.write_bytes(data.replace(b"MPP = 0.5", b"MPP = 0.4"))
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert changed.stat().st_size == stat.st_size
    assert changed.stat().st_mtime_ns == stat.st_mtime_ns

    second = prepare_site(site / "slides.csv", out, TINY)
    assert [r.state for r in second.records] == ["done", "reused"]
    after = read_feature_bag(out / "features" / "tiny_cnn" / "s1.h5")
    assert after.attrs["level0_mpp"] == pytest.approx(0.4)
    assert after.attrs["slide_sample_sha256"] != before.attrs["slide_sample_sha256"]
    status = json.loads((out / "status" / "s1.json").read_text())
    assert status["state"] == "done" and status["last_run_outcome"] == "prepared"
    assert status["why_prepared"] == (
        "slide file changed (content differs from when it was prepared)"
    )


@pytest.mark.slow
def test_unchanged_copied_and_touched_slides_are_reused(
    tmp_path: Path, slides: tuple[Path, list[SynthSlide]], monkeypatch: pytest.MonkeyPatch
) -> None:
    site, paths = _site(tmp_path, slides)
    out = tmp_path / "out"
    assert [r.state for r in prepare_site(site / "slides.csv", out, TINY).records] == [
        "done",
        "done",
    ]
    bag = out / "features" / "tiny_cnn" / "s1.h5"
    stamp = bag.stat().st_mtime_ns

    counter = _SampleCounter(monkeypatch)
    again = prepare_site(site / "slides.csv", out, TINY)
    assert [r.state for r in again.records] == ["reused", "reused"]
    assert counter.calls == 0  # unchanged: the fast path (size, mtime, ctime, inode) decides

    # The slides move to new storage (new inodes and ctimes), one of them touched.
    moved = site / "moved"
    moved.mkdir()
    new_paths = [Path(shutil.copy(p, moved / p.name)) for p in paths]
    os.utime(new_paths[1], ns=(1_000_000_000, 1_000_000_000))
    _manifest(site, new_paths)
    moved_run = prepare_site(site / "slides.csv", out, TINY)
    assert [r.state for r in moved_run.records] == ["reused", "reused"]
    assert counter.calls == 2  # one sampled hash per slide decided it
    assert bag.stat().st_mtime_ns == stamp  # nothing was embedded again

    # The verified identity is remembered: the next run takes the fast path again.
    prepare_site(site / "slides.csv", out, TINY)
    assert counter.calls == 2


def test_a_mirax_slide_is_fingerprinted_with_its_data_folder(tmp_path: Path) -> None:
    slide = tmp_path / "case.mrxs"
    slide.write_bytes(b"mirax index")
    (tmp_path / "case").mkdir()
    data = tmp_path / "case" / "Data0000.dat"
    data.write_bytes(b"A" * 1000)
    (tmp_path / "case" / "Slidedat.ini").write_text("[GENERAL]\n")
    first = fingerprint_module.fingerprint(slide)
    assert [p.name for p in first.files] == ["case.mrxs", "Data0000.dat", "Slidedat.ini"]
    sample = first.sample_sha256()
    stat = data.stat()
    data.write_bytes(b"B" * 1000)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = fingerprint_module.fingerprint(slide)
    assert second.size == first.size
    assert second.sample_sha256() != sample


# ---------------------------------------------------------------- 3: the record of the work


@pytest.mark.slow
def test_a_rerun_keeps_the_record_of_the_run_that_did_the_work(
    tmp_path: Path,
    slides: tuple[Path, list[SynthSlide]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedpath.deploy.cli import EXIT_OK, main

    monkeypatch.setenv("COLUMNS", "200")
    site, _ = _site(tmp_path, slides)
    out = tmp_path / "out"
    argv = ["prepare", "--manifest", str(site / "slides.csv"), "--out", str(out)]
    argv += ["--encoder", "tiny_cnn"]
    assert main(argv) == EXIT_OK
    assert "2 done, 0 reused, 0 failed" in capsys.readouterr().out
    first = json.loads((out / "status" / "s1.json").read_text())
    assert first["state"] == "done" and first["seconds"]["embedding"] > 0
    assert first["last_run_outcome"] == "prepared"
    assert first["prepared_at"] == read_attrs(out / "features/tiny_cnn/s1.h5")["prepared_at"]

    assert main(argv) == EXIT_OK
    assert "0 done, 2 reused, 0 failed" in capsys.readouterr().out
    second = json.loads((out / "status" / "s1.json").read_text())
    kept = ("state", "seconds", "num_patches", "prepared_at", "recorded_at", "mpp")
    assert {k: second[k] for k in kept} == {k: first[k] for k in kept}
    assert second["last_run_outcome"] == "reused"
    assert second["last_checked"] >= first["last_checked"]

    # A lost status file is rebuilt from the bag: still done, with the bag's date.
    (out / "status" / "s2.json").unlink()
    assert main(argv) == EXIT_OK
    rebuilt = json.loads((out / "status" / "s2.json").read_text())
    assert rebuilt["state"] == "done" and rebuilt["last_run_outcome"] == "reused"
    assert rebuilt["prepared_at"] == read_attrs(out / "features/tiny_cnn/s2.h5")["prepared_at"]


# ---------------------------------------------------------------- 4: refused writes


def _run_prepare(
    site: Path, out: Path, *, file_size_limit: int | None = None
) -> subprocess.CompletedProcess[str]:
    """``fedpath prepare`` in its own process, optionally under a file-size limit."""

    def limit() -> None:
        if file_size_limit is not None:
            # Ignored, SIGXFSZ would kill the process; ignored (inherited through exec), the
            # write fails with EFBIG, as on a full disk it fails with ENOSPC.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    command = [sys.executable, "-m", "fedpath.deploy.cli", "prepare"]
    command += ["--manifest", str(site / "slides.csv"), "--out", str(out)]
    command += ["--encoder", "tiny_cnn"]
    env = {**os.environ, "COLUMNS": "300", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,  # the limit applies to the child only
        check=False,
    )


def _assert_clean_failure(result: subprocess.CompletedProcess[str], out: Path) -> str:
    text = result.stdout + result.stderr
    assert result.returncode == 1, text  # not -11 (SIGSEGV) nor -25 (SIGXFSZ)
    for crash in ("Exception ignored", "Traceback", "HDF5-DIAG", "Segmentation fault"):
        assert crash not in text, text
    assert not list(out.rglob(f"{TMP_PREFIX}*"))
    return " ".join(text.split())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("limit", "stage", "file"),
    [
        (16 * 1024, "embedding", "features/tiny_cnn/s1.h5"),  # the feature bag (~30 KB)
        (256 * 1024, "outputs", "qc/s1.png"),  # bag and coordinates fit, the QC picture not
    ],
)
def test_a_file_too_large_fails_the_slide_with_one_message_and_exit_1(
    tmp_path: Path, slides: tuple[Path, list[SynthSlide]], limit: int, stage: str, file: str
) -> None:
    site, _ = _site(tmp_path, slides)
    out = tmp_path / "out"
    result = _run_prepare(site, out, file_size_limit=limit)
    text = _assert_clean_failure(result, out)
    message = f"cannot write {out / file}: File too large (EFBIG)"
    assert f"failed s1 (at {stage}): {message}" in text, text
    status = json.loads((out / "status" / "s1.json").read_text())
    assert (status["state"], status["stage"], status["reason"]) == ("failed", stage, message)
    # Nothing of the failed slide is left that a later run could trust.
    left = [p.relative_to(out) for p in out.rglob("s1.*") if p.parent.name != "status"]
    assert not left


@contextmanager
def _immutable(directory: Path) -> Iterator[None]:
    """A directory no one, root included, can create files in (ext4/xfs ``chattr +i``)."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, check=False)
    if done.returncode != 0:
        if os.geteuid() == 0:
            pytest.skip(f"chattr +i not possible here ({done.stderr.decode().strip()})")
        directory.chmod(0o555)  # not root: permission bits are enough
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], capture_output=True, check=False)
        directory.chmod(0o755)


@pytest.mark.slow
def test_a_read_only_output_folder_fails_each_slide_naming_the_file(
    tmp_path: Path, slides: tuple[Path, list[SynthSlide]]
) -> None:
    site, _ = _site(tmp_path, slides)
    out = tmp_path / "out"
    with _immutable(out / "qc"):
        result = _run_prepare(site, out)
    text = _assert_clean_failure(result, out)
    for slide_id in ("s1", "s2"):
        assert f"failed {slide_id} (at outputs): cannot write {out / 'qc' / slide_id}.png: " in text
    assert "(EPERM)" in text or "(EACCES)" in text, text
    assert "0 done, 0 reused, 2 failed" in text
    assert not list((out / "features").rglob("*.h5"))  # the slides' outputs were removed


@pytest.mark.slow
def test_site_files_that_cannot_be_written_are_reported_and_exit_1(
    tmp_path: Path, slides: tuple[Path, list[SynthSlide]]
) -> None:
    site, _ = _site(tmp_path, slides)
    out = tmp_path / "out"
    (out / "prepared.csv").mkdir(parents=True)  # a folder where the index must go
    result = _run_prepare(site, out)
    text = _assert_clean_failure(result, out)
    assert "2 done, 0 reused, 0 failed" in text
    assert f"error: cannot write {out / 'prepared.csv'}: Is a directory (EISDIR)" in text


@pytest.mark.slow
def test_a_status_file_that_cannot_be_written_fails_its_slide(
    tmp_path: Path, slides: tuple[Path, list[SynthSlide]]
) -> None:
    site, _ = _site(tmp_path, slides)
    out = tmp_path / "out"
    with _immutable(out / "status"):
        result = _run_prepare(site, out)
        text = _assert_clean_failure(result, out)
    assert f"failed s1 (at status): cannot write {out / 'status' / 's1.json'}: " in text
    assert not (out / "prepared.csv").read_text().strip().split("\n")[1:]


@pytest.mark.slow
def test_a_slide_that_changes_while_it_is_prepared_fails_and_leaves_no_outputs(
    tmp_path: Path, slides: tuple[Path, list[SynthSlide]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scanner or a copy still writing the file: the bag would describe neither version."""
    from fedpath.client.prepare import slide

    site, paths = _site(tmp_path, slides)
    real = slide.prepare_slide

    def prepare_while_written(*args: object, **kwargs: object) -> object:
        record = real(*args, **kwargs)  # type: ignore[arg-type]
        with paths[0].open("ab") as fh:  # the copy goes on writing the first slide
            fh.write(b"\0" * 10)
        return record

    monkeypatch.setattr(slide, "prepare_slide", prepare_while_written)
    out = tmp_path / "out"
    summary = prepare_site(site / "slides.csv", out, TINY)
    first = summary.records[0]
    assert (first.state, first.stage) == ("failed", "outputs")
    assert first.reason is not None
    assert first.reason.startswith("the slide file changed while it was being prepared")
    left = [p.relative_to(out) for p in out.rglob("s1.*") if p.parent.name != "status"]
    assert not left


@pytest.mark.slow
def test_an_output_folder_that_cannot_be_written_at_all_is_one_error_line(
    tmp_path: Path, slides: tuple[Path, list[SynthSlide]]
) -> None:
    """Nothing can be attempted: exit 2 (the CLI's "nothing was done" code), one line."""
    site, _ = _site(tmp_path, slides)
    out = tmp_path / "out"
    with _immutable(out):
        result = _run_prepare(site, out)
    text = result.stdout + result.stderr
    assert result.returncode == 2, text
    assert "Traceback" not in text
    flat = " ".join(text.split())
    assert f"error: cannot write {out / '.fedpath.lock'}: " in flat, text
    assert "(EPERM)" in flat or "(EACCES)" in flat or "(EROFS)" in flat
