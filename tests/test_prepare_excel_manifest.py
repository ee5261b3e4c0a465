"""`fedpath prepare` on manifests as Excel saves them (issue 20, point 6).

In much of Europe Excel's "CSV" is ';'-separated and Windows-1252, its "CSV UTF-8" starts with
a byte-order mark, and its "Unicode Text" is tab-separated UTF-16. Each used to be refused as
"missing required column(s)" or "not UTF-8 (invalid start byte at byte 61)" without saying why.
Run through the CLI's ``main`` on a tiny real slide, as a hospital would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedpath.deploy.cli import EXIT_OK, EXIT_USAGE, main
from tests.tiffs import write_pyramid

pytestmark = pytest.mark.integration

SIDE = 1024
APERIO = f"Aperio Image Library v10.0.0\n{SIDE}x{SIDE} |AppMag = 20|MPP = 0.5"


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(0)
    rgb = np.full((SIDE, SIDE, 3), 240, np.uint8)
    rgb[128:900, 100:950] = (200, 80, 170)
    rgb = (rgb + rng.integers(0, 20, rgb.shape)).astype(np.uint8)
    write_pyramid(root / "café.tiff", rgb, levels=2, compression="jpeg", description=APERIO)
    return root


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # rich would wrap the message at 80 columns


def _prepare(manifest: Path, out: Path) -> int:
    argv = ["prepare", "--manifest", str(manifest), "--out", str(out)]
    return main([*argv, "--encoder", "tiny_cnn", "--tissue-preset", "biopsy", "--no-qc"])


@pytest.mark.parametrize(
    ("name", "text", "encoding"),
    [
        ("semicolon", "slide_id;path;label;mpp\ns1;café.tiff;normal;0,25\n", "utf-8"),
        ("utf8_bom", "slide_id,path,label\ns1,café.tiff,normal\n", "utf-8-sig"),
        ("unicode_text", "slide_id\tpath\tlabel\ns1\tcafé.tiff\tnormal\n", "utf-16"),
    ],
)
def test_excel_manifests_are_prepared(
    slide_dir: Path, tmp_path: Path, name: str, text: str, encoding: str
) -> None:
    manifest = slide_dir / f"{name}.csv"
    manifest.write_bytes(text.encode(encoding))
    out = tmp_path / "out"
    assert _prepare(manifest, out) == EXIT_OK
    status = json.loads((out / "status" / "s1.json").read_text())
    assert status["state"] == "done" and status["num_patches"] > 0
    if name == "semicolon":
        assert status["mpp"] == 0.25  # "0,25": a decimal comma where ';' separates fields


def test_a_windows_1252_manifest_is_refused_with_the_fix(
    slide_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = slide_dir / "slides.csv"
    manifest.write_bytes("slide_id,path,label\ns1,café.tiff,normal\n".encode("cp1252"))
    out = tmp_path / "out"
    assert _prepare(manifest, out) == EXIT_USAGE
    text = capsys.readouterr().out
    assert (
        "slides.csv is not UTF-8 (byte 0xE9 at line 2, column 7 looks like Windows-1252/Latin-1 "
        '"é"); save it as "CSV UTF-8 (Comma delimited)" in Excel (Save As), or convert it with '
        "`iconv -f cp1252 -t utf-8 slides.csv > utf8-slides.csv`"
    ) in text
    assert "Nothing was prepared. Fix the manifest" in text
    assert not out.exists()
