"""Absolute paths of the rendering machine kept out of the mailed page.

A run's text (failure reasons, ``runs-dir``, ``resume``) is written on the coordinator's machine
and can name its folders; the page is mailed, so such paths are shown relative to the run
directory, and a path elsewhere by its last part. Plain text in, plain text out: the page
applies the scrub to every value before it is escaped.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

_BEFORE = r"(?<![\w.\-/\\])"
_AFTER = r"(?![\w.\-])"


class PathScrub:
    """Rewrites the absolute paths of the rendering machine that a run's text may hold.

    The run directory's content is shown as ``checkpoints/…``, the run directory itself by its
    name, its parent folder as ``..`` and the home folder as ``~``. Both the path as given and
    as resolved (symlinks) are rewritten; a match must start and end at a path boundary, so
    ``/runs/demo`` is not rewritten inside ``/data/runs/demo-2``.
    """

    def __init__(self, run_dir: Path, home: Path | None = None) -> None:
        resolved = run_dir.resolve()
        name = resolved.name or "."
        pairs: dict[str, str] = {}
        for root in dict.fromkeys([run_dir.absolute(), resolved]):
            pairs[str(root)] = name
            parent = root.parent
            if parent != Path(parent.anchor):
                pairs[str(parent)] = ".."
        if home is None:
            try:
                home = Path.home()
            except (RuntimeError, KeyError):  # no HOME and no passwd entry
                home = None
        if home is not None and home.is_absolute() and home != Path(home.anchor):
            pairs.setdefault(str(home), "~")
        self._rules: list[tuple[re.Pattern[str], str]] = []
        for old, new in sorted(pairs.items(), key=lambda item: len(item[0]), reverse=True):
            inside = "" if new == name else new + "/"
            self._rules.append((re.compile(_BEFORE + re.escape(old) + r"[/\\]"), inside))
            self._rules.append((re.compile(_BEFORE + re.escape(old) + _AFTER), new))

    def __call__(self, text: str) -> str:
        for pattern, replacement in self._rules:
            text = pattern.sub(lambda _m, r=replacement: r, text)
        return text


def is_absolute_path(text: str) -> bool:
    """True for a POSIX or Windows absolute path (the run may come from either kind of host)."""
    return PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute()


def shown_path(value: Any, scrub: PathScrub) -> Any:
    """A string setting as the page shows it: run-relative where :class:`PathScrub` can make it
    so, and an absolute path it cannot (a data folder elsewhere) by its last part: ``…/name``."""
    if not isinstance(value, str):
        return value
    value = scrub(value)
    if not is_absolute_path(value):
        return value
    name = re.split(r"[\\/]", value.rstrip("\\/"))[-1]
    return f"…/{name}" if name and not name.endswith(":") else "…"
