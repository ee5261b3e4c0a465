"""The hospital's slide manifest: parsed and validated in full before any slide is touched.

A preparation run can take hours; discovering a typo in row 412 after three of them is
unacceptable. So every row is checked up front and *all* problems are reported together, each
with its CSV line number. A bad row costs only itself: it comes back as a ``RejectedRow`` and
the valid rows are prepared, because one typo must not hold back a night's work on the other
slides. Only problems that make every row doubtful (not a readable CSV file, a bad header, no
usable row at all) raise ``ManifestError``. Slide ids become file names, so they are restricted
to a safe alphabet, and slide paths must stay inside the slide root (a manifest must not be
able to make fedpath read ``/etc/shadow`` or write outside its output directory).

Manifests are mostly written in Excel, whose defaults in much of Europe are a ``;`` separator
and a Windows code page: the separator is accepted when the header leaves no doubt, a
byte-order mark (UTF-8 or UTF-16) is read as such, and text in any other encoding is refused
with the byte at fault and how to re-save it, never guessed (a guessed é in a path would
name another file).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedpath.common.errors import ManifestError

REQUIRED_COLUMNS: tuple[str, ...] = ("slide_id", "path", "label")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "annotation",
    "annotation_complete",
    "split",
    "patient_id",
    "mpp",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
SLIDE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DELIMITERS: tuple[str, ...] = (",", ";", "\t")
"""Comma first: it wins whenever its header is valid. Excel writes ``;`` where the decimal
separator is a comma, and a tab for "Unicode text"."""
_DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab"}
_TRUE = {"true", "yes", "1", "y", "t"}
_FALSE = {"false", "no", "0", "n", "f"}
MAX_MANIFEST_BYTES = 50 * 1024 * 1024


@dataclass(frozen=True)
class ManifestRow:
    """One validated slide entry; ``line`` is its line number in the CSV (header is line 1)."""

    line: int
    slide_id: str
    path: Path
    label: str
    annotation: Path | None = None
    annotation_complete: bool | None = None
    split: str | None = None
    patient_id: str | None = None
    mpp: float | None = None


@dataclass(frozen=True)
class RejectedRow:
    """A slide id that will not be prepared, with every problem of the rows that name it.

    Rows sharing one id are rejected together (``lines`` holds all of them): either could be
    the wrong slide, and preparing one would file its features under the other's label.
    """

    slide_id: str
    """As written in the manifest: may be empty or unsafe as a file name."""
    lines: tuple[int, ...]
    problems: tuple[str, ...]
    """Each starts with its CSV line number(s)."""

    @property
    def line(self) -> int:
        return self.lines[0]

    @property
    def safe_id(self) -> bool:
        """True when ``slide_id`` may be used as a file name (its status file's)."""
        return bool(SLIDE_ID_PATTERN.match(self.slide_id))


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: usable rows in file order, rejected ids, the labels checked."""

    path: Path
    rows: tuple[ManifestRow, ...]
    labels: tuple[str, ...]
    rejected: tuple[RejectedRow, ...] = ()
    """In order of their first line."""

    @property
    def problems(self) -> list[str]:
        """Every row problem, in line order (the list a ``ManifestError`` would carry)."""
        return [p for r in self.rejected for p in r.problems]


def parse_bool(text: str) -> bool | None:
    """Parse the spellings of a boolean found in spreadsheets; None when unrecognised."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def _resolve_inside(raw: str, base: Path, root: Path) -> tuple[Path | None, str | None]:
    """Resolve ``raw`` (relative to ``base``) and require it to stay within ``root``."""
    candidate = Path(raw).expanduser()
    resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
    if not resolved.is_relative_to(root):
        return None, f"path '{raw}' resolves to {resolved}, outside the slide root {root}"
    return resolved, None


def load_manifest(
    path: str | Path,
    labels: Sequence[str],
    *,
    slide_root: str | Path | None = None,
    check_files: bool = True,
) -> Manifest:
    """Read and validate a manifest; bad rows come back in ``Manifest.rejected``.

    Raises ``ManifestError`` listing every problem found when no row can be trusted: the file
    is missing, too large, not UTF-8 or not CSV, its header is wrong, or no row is usable.
    Relative paths are resolved against the manifest's folder. ``slide_root`` (default: that
    folder) bounds where slides and annotations may live.
    """
    manifest_path = Path(path).expanduser().resolve()
    if not manifest_path.is_file():
        raise ManifestError(str(path), ["file does not exist"])
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(str(path), [f"file is larger than {MAX_MANIFEST_BYTES} bytes"])
    base = manifest_path.parent
    root = Path(slide_root).expanduser().resolve() if slide_root is not None else base
    text = decode_manifest(manifest_path.read_bytes(), manifest_path.name, str(path))
    lines = text.splitlines()
    if not lines:
        raise ManifestError(str(path), ["file is empty (no header row)"])
    delimiter, header_problems = sniff_delimiter(lines[0])

    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise ManifestError(str(path), ["file is empty (no header row)"]) from None
    except csv.Error as exc:
        raise ManifestError(str(path), [f"line 1: not valid CSV ({exc})"]) from exc

    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        header_problems.append(f"line 1: missing required column(s): {', '.join(missing)}")
    unknown = [c for c in header if c not in known]
    if unknown:
        header_problems.append(
            f"line 1: unknown column(s): {', '.join(repr(c) for c in unknown)} "
            f"(allowed: {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)})"
        )
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:
        header_problems.append(f"line 1: duplicated column(s): {', '.join(duplicated)}")
    if missing or duplicated:
        raise ManifestError(str(path), header_problems)

    try:
        records = list(enumerate(reader, start=2))
    except csv.Error as exc:
        raise ManifestError(str(path), [*header_problems, f"not valid CSV ({exc})"]) from exc
    checked = [
        _check_record(line, values, header, tuple(labels), base, root, check_files, delimiter)
        for line, values in records
        if any(v.strip() for v in values)  # blank lines are harmless
    ]
    rows, rejected = _reject_duplicates(checked)
    problems = [p for r in rejected for p in r.problems]
    if header_problems:
        # An unknown column is usually a misspelt known one: no row's values can be trusted.
        raise ManifestError(str(path), [*header_problems, *problems])
    if not checked:
        raise ManifestError(str(path), ["no slide rows after the header"])
    if not rows:
        raise ManifestError(str(path), [*problems, "no row is usable: nothing to prepare"])
    return Manifest(manifest_path, tuple(rows), tuple(labels), tuple(rejected))


@dataclass(frozen=True)
class _Checked:
    """One non-blank CSV record after its own checks, before ids are compared across rows."""

    line: int
    slide_id: str
    row: ManifestRow | None
    problems: tuple[str, ...]


def _check_record(
    line: int,
    values: list[str],
    header: list[str],
    labels: tuple[str, ...],
    base: Path,
    root: Path,
    check_files: bool,
    delimiter: str = ",",
) -> _Checked:
    """Validate one record; a record with the wrong field count keeps its id if it has one."""
    if len(values) != len(header):
        position = header.index("slide_id")
        slide_id = values[position].strip() if position < len(values) else ""
        problem = f"line {line}: has {len(values)} fields, the header has {len(header)}"
        return _Checked(line, slide_id, None, (problem,))
    cells = {h: v.strip() for h, v in zip(header, values, strict=True)}
    row, problems = _validate_row(line, cells, labels, base, root, check_files, delimiter)
    return _Checked(line, cells["slide_id"], row, tuple(problems))


def _reject_duplicates(
    checked: list[_Checked],
) -> tuple[list[ManifestRow], list[RejectedRow]]:
    """Split records into usable rows and rejected ids.

    An id used on several lines rejects all of them, including lines that are fine on their
    own: fedpath cannot tell which one is the slide the hospital meant.
    """
    by_id: dict[str, list[_Checked]] = {}
    for record in checked:
        if record.slide_id:
            by_id.setdefault(record.slide_id, []).append(record)
    rows: list[ManifestRow] = []
    rejected: list[RejectedRow] = []
    for record in checked:
        group = by_id.get(record.slide_id, [record])
        if len(group) > 1:
            if record is not group[0]:
                continue  # reported once, at the id's first line
            lines = tuple(c.line for c in group)
            listed = ", ".join(str(n) for n in lines[:-1]) + f" and {lines[-1]}"
            duplicate = (
                f"lines {listed}: duplicate slide_id '{record.slide_id}': none of these rows is "
                "prepared (any of them could be the wrong slide); give each slide its own id"
            )
            problems = (duplicate, *(p for c in group for p in c.problems))
            rejected.append(RejectedRow(record.slide_id, lines, problems))
        elif record.row is None:
            rejected.append(RejectedRow(record.slide_id, (record.line,), record.problems))
        else:
            rows.append(record.row)
    return rows, rejected


def _validate_row(
    line: int,
    cells: dict[str, str],
    labels: tuple[str, ...],
    base: Path,
    root: Path,
    check_files: bool,
    delimiter: str = ",",
) -> tuple[ManifestRow | None, list[str]]:
    """Check one row; returns the row (or None when unusable) and its problems."""
    problems: list[str] = []
    slide_id = cells["slide_id"]
    if not slide_id:
        problems.append(f"line {line}: empty slide_id")
    elif not SLIDE_ID_PATTERN.match(slide_id):
        problems.append(
            f"line {line}: slide_id '{slide_id}' must be 1-128 characters of letters, digits, "
            "'.', '_' or '-', starting with a letter or digit (it becomes a file name)"
        )
    where = f"line {line} ({slide_id or 'no id'})"

    slide_path: Path | None = None
    if not cells["path"]:
        problems.append(f"{where}: empty path")
    else:
        slide_path, error = _resolve_inside(cells["path"], base, root)
        if error:
            problems.append(f"{where}: {error}")
        elif check_files and slide_path is not None and not slide_path.is_file():
            problems.append(f"{where}: slide file not found: {slide_path}")

    label = cells["label"]
    if label not in labels:
        problems.append(f"{where}: unknown label '{label}' (expected one of: {', '.join(labels)})")

    annotation: Path | None = None
    raw_annotation = cells.get("annotation", "")
    if raw_annotation:
        annotation, error = _resolve_inside(raw_annotation, base, root)
        if error:
            problems.append(f"{where}: annotation {error}")
        elif check_files and annotation is not None and not annotation.is_file():
            problems.append(f"{where}: annotation file not found: {annotation}")

    complete: bool | None = None
    raw_complete = cells.get("annotation_complete", "")
    if raw_complete:
        complete = parse_bool(raw_complete)
        if complete is None:
            problems.append(f"{where}: annotation_complete '{raw_complete}' is not true/false")
        elif not raw_annotation:
            problems.append(f"{where}: annotation_complete is set but there is no annotation")
    elif raw_annotation:
        complete = False  # without a statement, only outlined regions are trusted

    split = cells.get("split", "") or None
    if split is not None and split not in SPLITS:
        problems.append(f"{where}: unknown split '{split}' (expected {', '.join(SPLITS)} or empty)")

    mpp: float | None = None
    raw_mpp = cells.get("mpp", "")
    if raw_mpp:
        # Where ';' separates fields, Excel writes decimal commas; unambiguous there.
        number = raw_mpp.replace(",", ".", 1) if delimiter != "," else raw_mpp
        try:
            mpp = float(number)
        except ValueError:
            hint = " (write it with a decimal point)" if "," in raw_mpp else ""
            problems.append(f"{where}: mpp '{raw_mpp}' is not a number{hint}")
        else:
            if not 0.01 <= mpp <= 100:
                problems.append(f"{where}: mpp {mpp} is outside 0.01-100 µm/px")
                mpp = None

    if problems or slide_path is None:
        return None, problems
    return (
        ManifestRow(
            line=line,
            slide_id=slide_id,
            path=slide_path,
            label=label,
            annotation=annotation,
            annotation_complete=complete,
            split=split,
            patient_id=cells.get("patient_id", "") or None,
            mpp=mpp,
        ),
        problems,
    )


# --------------------------------------------------------------------------------------------
# Encoding and separator: what Excel writes
# --------------------------------------------------------------------------------------------


def decode_manifest(data: bytes, name: str, shown: str) -> str:
    """The manifest's text: UTF-8 (with or without byte-order mark) or BOM-marked UTF-16.

    Anything else is refused naming the first byte that is not UTF-8, with the character it
    would be in Windows-1252 (what Excel's "CSV" writes in Western Europe) and the two ways to
    fix the file. UTF-16 without a mark (many zero bytes) is named as such.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            problem = f"starts with a UTF-16 byte-order mark but is not UTF-16 text ({exc.reason})"
            raise ManifestError(shown, [problem]) from None
    if data.count(b"\x00") > len(data) // 4:  # ASCII in UTF-16: every other byte is zero
        problem = (
            f"{name} is not UTF-8: it looks like UTF-16 without a byte-order mark (Excel's "
            '"Unicode Text"); ' + _FIX.format(enc="utf-16le", name=name)
        )
        raise ManifestError(shown, [problem])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(shown, [_not_utf8_problem(data, exc, name)]) from None


_FIX = (
    'save it as "CSV UTF-8 (Comma delimited)" in Excel (Save As), or convert it with '
    "`iconv -f {enc} -t utf-8 {name} > utf8-{name}`"
)


def _not_utf8_problem(data: bytes, exc: UnicodeDecodeError, name: str) -> str:
    start = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
    byte = data[start]
    line = data.count(b"\n", 0, start) + 1
    line_start = data.rfind(b"\n", 0, start) + 1
    column = len(data[line_start:start].decode("utf-8-sig", errors="replace")) + 1
    try:
        char = bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:
        char = ""
    looks = f' looks like Windows-1252/Latin-1 "{char}"' if char.isprintable() and char else ""
    return (
        f"{name} is not UTF-8 (byte 0x{byte:02X} at line {line}, column {column}{looks}); "
        + _FIX.format(enc="cp1252", name=name)
    )


def sniff_delimiter(header_line: str) -> tuple[str, list[str]]:
    """The field separator, and a note to put before header problems (empty when none).

    A comma whose header is valid wins. Otherwise ``;`` or a tab is taken only when the header
    splits on it into known columns, the required ones included, and does not split on a
    comma: then no reading but one is possible. When no separator gives a valid header, the
    one naming the most known columns is used, so the problems listed are about the real
    column names, and the note says which separator was assumed.
    """
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)

    def names(delimiter: str) -> list[str]:
        try:
            row = next(csv.reader([header_line], delimiter=delimiter), [])
        except csv.Error:
            return []
        return [n.strip() for n in row]

    def valid(columns: list[str]) -> bool:
        return (
            set(columns) <= known
            and set(REQUIRED_COLUMNS) <= set(columns)
            and len(set(columns)) == len(columns)
        )

    if valid(names(",")):
        return ",", []
    for delimiter in DELIMITERS[1:]:
        if len(names(",")) == 1 and valid(names(delimiter)):
            return delimiter, []
    best = max(DELIMITERS, key=lambda d: sum(1 for n in names(d) if n in known))
    if best == "," or sum(1 for n in names(best) if n in known) == 0:
        return ",", []
    note = (
        f"line 1: read as {_DELIMITER_NAMES[best]}-separated (its names are separated by "
        f"{best!r}, not by commas); a {_DELIMITER_NAMES[best]}-separated manifest is "
        "accepted only when every column name is known"
    )
    return best, [note]
