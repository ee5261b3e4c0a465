"""Where a prepared site keeps each artefact (``patches/``, ``features/``, ``status/``, ...).

Preparation writes these paths, resume reads them back and ``fedpath local`` finds a site's
patch files through them: one class keeps the three from drifting apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedpath.client.prepare.manifest import RejectedRow


@dataclass(frozen=True)
class SiteLayout:
    """Where a prepared site keeps each artefact (DESIGN §3)."""

    root: Path
    encoder_dir: str

    def coords(self, slide_id: str) -> Path:
        return self.root / "patches" / f"{slide_id}.h5"

    def features(self, slide_id: str) -> Path:
        return self.root / "features" / self.encoder_dir / f"{slide_id}.h5"

    def qc(self, slide_id: str) -> Path:
        return self.root / "qc" / f"{slide_id}.png"

    def contours(self, slide_id: str) -> Path:
        return self.root / "contours" / f"{slide_id}.geojson"

    def status(self, slide_id: str) -> Path:
        return self.root / "status" / f"{slide_id}.json"

    def rejected_status(self, rejected: RejectedRow) -> Path:
        """A rejected row's status file: by its id when that is a safe file name, else by its
        line (the ``_`` prefix cannot start a valid slide id, so the two never collide)."""
        if rejected.safe_id:
            return self.status(rejected.slide_id)
        return self.root / "status" / f"_line-{rejected.line}.json"

    def outputs(self, slide_id: str) -> tuple[Path, ...]:
        return (
            self.features(slide_id),
            self.coords(slide_id),
            self.qc(slide_id),
            self.contours(slide_id),
        )


def encoder_dir_name(encoder_id: str) -> str:
    """A file-system-safe folder name for an encoder id (ids of local checkpoints hold paths)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in encoder_id)
    return safe.strip("._") or "encoder"
