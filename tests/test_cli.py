"""The ``fedpath`` command: exit codes, messages, and the demo end to end (tiny settings)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedpath.deploy.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().out


def test_manifest_problems_exit_2_and_list_every_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "slides.csv"
    manifest.write_text("slide_id,path,label\na,missing.svs,normal\nb,gone.svs,cancer\n")
    code, out = _run(["prepare", "--manifest", str(manifest), "--out", str(tmp_path / "o")], capsys)
    assert code == EXIT_USAGE
    assert "line 2 (a): slide file not found" in out
    assert "line 3 (b): unknown label 'cancer'" in out
    assert "Nothing was prepared" in out
    assert not (tmp_path / "o").exists()


def test_bad_config_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "prepare.toml"
    config.write_text("[tissue]\nthreshold = 3\n")
    manifest = tmp_path / "slides.csv"
    manifest.write_text("slide_id,path,label\n")
    code, out = _run(
        ["prepare", "--manifest", str(manifest), "--out", str(tmp_path), "--config", str(config)],
        capsys,
    )
    assert code == EXIT_USAGE
    assert "tissue.threshold: unknown setting" in out


@pytest.mark.slow
def test_unknown_encoder_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    slide = tmp_path / "s"
    code, _ = _run(["synth", "slide", str(slide), "--width", "1024", "--height", "1024"], capsys)
    assert code == EXIT_OK
    manifest = slide / "slides.csv"
    manifest.write_text("slide_id,path,label\ns,slides/synthetic.tiff,normal\n")
    code, out = _run(
        [
            "prepare",
            "--manifest",
            str(manifest),
            "--out",
            str(tmp_path / "o"),
            "--encoder",
            "no_such_encoder",
        ],
        capsys,
    )
    assert code == EXIT_USAGE
    assert "no_such_encoder" in out


@pytest.mark.slow
@pytest.mark.integration
def test_prepare_exit_1_when_a_slide_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = _run(
        [
            "synth",
            "slide",
            str(tmp_path),
            "--slide-id",
            "good",
            "--width",
            "2048",
            "--height",
            "2048",
            "--tumour-fraction",
            "0.3",
        ],
        capsys,
    )
    assert code == EXIT_OK
    (tmp_path / "slides" / "bad.svs").write_text("not a slide")
    manifest = tmp_path / "slides.csv"
    manifest.write_text(
        "slide_id,path,label,annotation,annotation_complete\n"
        "good,slides/good.tiff,tumour,annotations/good.geojson,true\n"
        "bad,slides/bad.svs,normal,,\n"
    )
    args = [
        "prepare",
        "--manifest",
        str(manifest),
        "--out",
        str(tmp_path / "out"),
        "--encoder",
        "tiny_cnn",
        "--tissue-preset",
        "biopsy",
    ]
    code, out = _run(args, capsys)
    assert code == EXIT_PARTIAL
    assert "1 done, 0 reused, 1 failed" in out
    assert "bad" in out and "not a slide format OpenSlide can read" in out
    # Fix the manifest and re-run: the finished slide is skipped, the exit code is clean.
    manifest.write_text(manifest.read_text().replace("bad,slides/bad.svs,normal,,\n", ""))
    code, out = _run(args, capsys)
    assert code == EXIT_OK and "0 done, 1 reused, 0 failed" in out


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "fedpath"
    exe = str(script) if script.exists() else shutil.which("fedpath")
    if exe is None:
        pytest.skip("the fedpath console script is not installed in this environment")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("prepare", "synth", "demo", "encoders"):
        assert command in result.stdout


def test_encoders_lists_registry_without_loading_weights(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = _run(["encoders"], capsys)
    assert code == EXIT_OK
    for name, dim in (
        ("efficientnet_lite0", "1280"),
        ("resnet50_trunc", "1024"),
        ("tiny_cnn", "64"),
    ):
        line = next(row for row in out.splitlines() if name in row)
        assert dim in line
    assert "--weights" in out  # resnet50_trunc says how to provide its weights


def test_an_error_is_printed_whole_and_as_text_at_80_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Error messages were printed as rich markup and wrapped: "[annotation]" vanished and a
    long path or a command to copy was broken across lines."""
    monkeypatch.setenv("COLUMNS", "80")
    run = tmp_path / "a_rather_long_folder_name_to_pass_eighty_columns" / "[annotation]" / "run"
    assert main(["report", str(run)]) == 2
    out = capsys.readouterr().out
    assert f"run directory {run} does not exist" in out.splitlines()
