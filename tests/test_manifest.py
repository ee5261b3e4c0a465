"""Manifest validation: every problem reported at once, with line numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpath.client.prepare.manifest import load_manifest, parse_bool
from fedpath.common.errors import ManifestError

LABELS = ("normal", "tumour")


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "b.svs").write_bytes(b"x")
    (tmp_path / "a.geojson").write_text("{}")
    path = tmp_path / "slides.csv"
    path.write_text(text)
    return path


def _problems(path: Path, **kwargs: object) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path, LABELS, **kwargs)  # type: ignore[arg-type]
    return info.value.problems


def test_valid_manifest_resolves_paths_and_defaults(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "slide_id,path,label,annotation,annotation_complete,split,patient_id,mpp\n"
        "a,a.svs,tumour,a.geojson,true,train,p1,0.25\n"
        "\n"
        "b,b.svs,normal,,,test,p2,\n",
    )
    manifest = load_manifest(path, LABELS)
    a, b = manifest.rows
    assert a.path == (tmp_path / "a.svs").resolve()
    assert a.annotation == (tmp_path / "a.geojson").resolve()
    assert a.annotation_complete is True and a.mpp == 0.25 and a.split == "train"
    assert a.line == 2 and b.line == 4
    assert b.annotation is None and b.annotation_complete is None and b.mpp is None
    assert b.patient_id == "p2"


def test_annotation_without_completeness_is_treated_as_partial(tmp_path: Path) -> None:
    path = _write(tmp_path, "slide_id,path,label,annotation\na,a.svs,tumour,a.geojson\n")
    assert load_manifest(path, LABELS).rows[0].annotation_complete is False


def test_all_row_problems_reported_together_with_line_numbers(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "slide_id,path,label,annotation,annotation_complete,split,mpp\n"
        "a,a.svs,tumour,,,,\n"
        "a,b.svs,normal,,,,\n"  # duplicate id
        "c,missing.svs,normal,,,,\n"  # missing file
        "d,a.svs,cancer,,,,\n"  # unknown label
        "e,../outside.svs,normal,,,,\n"  # escapes the slide root
        "f,a.svs,tumour,nope.xml,maybe,validation,abc\n"
        "../g,a.svs,normal,,,,\n"  # unsafe id
        "h,a.svs,normal,,true,,\n"  # completeness without annotation
        "i,a.svs\n"  # wrong field count
        "j,b.svs,normal,,,,\n",  # fine
    )
    manifest = load_manifest(path, LABELS)
    assert [r.slide_id for r in manifest.rows] == ["j"]
    problems = manifest.problems
    text = "\n".join(problems)
    assert "lines 2 and 3: duplicate slide_id 'a': none of these rows is prepared" in text
    assert "line 4 (c): slide file not found" in text
    assert "line 5 (d): unknown label 'cancer'" in text
    assert "line 6 (e): path '../outside.svs'" in text and "outside the slide root" in text
    assert "line 7 (f): annotation file not found" in text
    assert "line 7 (f): annotation_complete 'maybe' is not true/false" in text
    assert "line 7 (f): unknown split 'validation'" in text
    assert "line 7 (f): mpp 'abc' is not a number" in text
    assert "line 8: slide_id '../g' must be" in text
    assert "line 9 (h): annotation_complete is set but there is no annotation" in text
    assert "line 10: has 2 fields, the header has 7" in text
    assert len(problems) == 11
    rejected = {r.slide_id: r for r in manifest.rejected}
    assert list(rejected) == ["a", "c", "d", "e", "f", "../g", "h", "i"]  # by first line
    assert rejected["a"].lines == (2, 3) and rejected["f"].lines == (7,)
    assert len(rejected["f"].problems) == 4
    assert not rejected["../g"].safe_id and rejected["i"].safe_id


def test_a_duplicate_id_rejects_every_row_using_it(tmp_path: Path) -> None:
    """Either row could be the wrong slide: preparing the first would file its features under a
    label the hospital may have meant for the other."""
    path = _write(
        tmp_path,
        "slide_id,path,label\n"
        "a,a.svs,tumour\n"
        "b,b.svs,normal\n"
        "a,b.svs,normal\n"
        "a,b.svs,cancer\n",  # its own problem is reported too
    )
    manifest = load_manifest(path, LABELS)
    assert [r.slide_id for r in manifest.rows] == ["b"]
    (dup,) = manifest.rejected
    assert dup.lines == (2, 4, 5)
    assert dup.problems[0].startswith("lines 2, 4 and 5: duplicate slide_id 'a': none of")
    assert dup.problems[1].startswith("line 5 (a): unknown label 'cancer'")


def test_no_usable_row_is_one_error_with_every_problem(tmp_path: Path) -> None:
    path = _write(tmp_path, "slide_id,path,label\na,a.svs,cancer\nb,nope.svs,normal\n")
    problems = _problems(path)
    assert problems[0].startswith("line 2 (a): unknown label 'cancer'")
    assert problems[1].startswith("line 3 (b): slide file not found")
    assert problems[2] == "no row is usable: nothing to prepare"


def test_header_problems(tmp_path: Path) -> None:
    path = _write(tmp_path, "slide_id,file,label,colour\na,a.svs,tumour,red\n")
    text = "\n".join(_problems(path))
    assert "missing required column(s): path" in text
    assert "unknown column(s): 'file', 'colour'" in text


def test_an_unknown_column_stops_the_batch_with_the_row_problems_too(tmp_path: Path) -> None:
    """A misspelt optional column (``anotation``) means every row lost a value: no row can be
    trusted, but the hospital still sees every row problem in the same message."""
    path = _write(
        tmp_path, "slide_id,path,label,anotation\na,a.svs,tumour,a.geojson\nb,b.svs,cancer,\n"
    )
    problems = _problems(path)
    assert problems[0].startswith("line 1: unknown column(s): 'anotation'")
    assert problems[1].startswith("line 3 (b): unknown label 'cancer'")
    assert len(problems) == 2


def test_empty_and_missing_files(tmp_path: Path) -> None:
    assert _problems(tmp_path / "nope.csv") == ["file does not exist"]
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "no header" in _problems(empty)[0]
    header_only = tmp_path / "header.csv"
    header_only.write_text("slide_id,path,label\n")
    assert _problems(header_only) == ["no slide rows after the header"]


def test_not_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("slide_id,path,label\nb\xe9,a.svs,normal\n".encode("latin-1"))
    assert "not UTF-8" in _problems(path)[0]


def test_slide_root_allows_absolute_paths_inside_it(tmp_path: Path) -> None:
    store = tmp_path / "nas"
    store.mkdir()
    (store / "s.svs").write_bytes(b"x")
    sheet_dir = tmp_path / "sheets"
    sheet_dir.mkdir()
    path = sheet_dir / "slides.csv"
    path.write_text(f"slide_id,path,label\ns,{store / 's.svs'},normal\n")
    assert "outside the slide root" in _problems(path)[0]
    manifest = load_manifest(path, LABELS, slide_root=store)
    assert manifest.rows[0].path == (store / "s.svs").resolve()


def test_symlink_escaping_root_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.svs"
    outside.write_bytes(b"x")
    inside = tmp_path / "site"
    inside.mkdir()
    (inside / "link.svs").symlink_to(outside)
    path = inside / "slides.csv"
    path.write_text("slide_id,path,label\ns,link.svs,normal\n")
    assert "outside the slide root" in _problems(path)[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("TRUE", True), ("yes", True), ("1", True), ("False", False), ("n", False), ("?", None)],
)
def test_parse_bool(text: str, expected: bool | None) -> None:
    assert parse_bool(text) is expected


# --------------------------------------------------------------------------------------------
# What Excel writes (issue 20, point 6)
# --------------------------------------------------------------------------------------------

_ROWS = "slide_id{d}path{d}label{d}mpp\na{d}a.svs{d}tumour{d}0.25\nb{d}b.svs{d}normal{d}\n"


def _write_bytes(tmp_path: Path, data: bytes) -> Path:
    path = _write(tmp_path, "")
    path.write_bytes(data)
    return path


def test_a_semicolon_separated_manifest_with_an_unambiguous_header_is_accepted(
    tmp_path: Path,
) -> None:
    # Excel in a decimal-comma locale: ';' between fields, ',' in numbers.
    path = _write(tmp_path, _ROWS.format(d=";").replace("0.25", "0,25"))
    a, b = load_manifest(path, LABELS).rows
    assert (a.slide_id, a.label, a.mpp, b.slide_id) == ("a", "tumour", 0.25, "b")
    assert a.path == (tmp_path / "a.svs").resolve()


def test_a_tab_separated_utf16_manifest_excel_unicode_text_is_accepted(tmp_path: Path) -> None:
    path = _write_bytes(tmp_path, _ROWS.format(d="\t").encode("utf-16"))  # with its BOM
    assert [r.slide_id for r in load_manifest(path, LABELS).rows] == ["a", "b"]


def test_utf8_with_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = _write_bytes(tmp_path, _ROWS.format(d=",").encode("utf-8-sig"))
    assert load_manifest(path, LABELS).rows[0].slide_id == "a"


def test_a_semicolon_header_with_an_unknown_name_is_refused_saying_how_it_was_read(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, "slide_id;path;label;colour\na;a.svs;tumour;red\n")
    problems = _problems(path)
    assert problems[0] == (
        "line 1: read as semicolon-separated (its names are separated by ';', not by commas); "
        "a semicolon-separated manifest is accepted only when every column name is known"
    )
    assert problems[1].startswith("line 1: unknown column(s): 'colour'")


def test_a_comma_in_a_number_of_a_comma_separated_file_says_to_use_a_point(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, 'slide_id,path,label,mpp\na,a.svs,tumour,"0,25"\n')
    assert _problems(path)[0] == (
        "line 2 (a): mpp '0,25' is not a number (write it with a decimal point)"
    )
    assert _problems(path)[-1] == "no row is usable: nothing to prepare"


def test_a_windows_1252_manifest_is_refused_naming_the_byte_and_the_fix(tmp_path: Path) -> None:
    data = "slide_id,path,label\na,a.svs,normal\nb,b.svs,normal\nc,caf\u00e9.svs,normal\n"
    path = _write_bytes(tmp_path, data.encode("cp1252"))
    assert _problems(path) == [
        "slides.csv is not UTF-8 (byte 0xE9 at line 4, column 6 looks like Windows-1252/Latin-1 "
        '"é"); save it as "CSV UTF-8 (Comma delimited)" in Excel (Save As), or convert it with '
        "`iconv -f cp1252 -t utf-8 slides.csv > utf8-slides.csv`"
    ]


def test_utf16_without_byte_order_mark_is_named(tmp_path: Path) -> None:
    path = _write_bytes(tmp_path, _ROWS.format(d="\t").encode("utf-16-le"))
    problem = _problems(path)[0]
    assert "looks like UTF-16 without a byte-order mark" in problem
    assert "iconv -f utf-16le -t utf-8 slides.csv" in problem
