"""A slide's patch file (``patches/<slide_id>.h5``) read back for embedding without re-cutting.

``fedpath prepare --patch-only`` stops after segmentation, patching, QC and annotation labels;
a later ``fedpath prepare`` on the same folder embeds the patches it finds here instead of
segmenting again, when the file says it was cut from the same slide with the same settings
(``patches_config_sha256``). The layout is CLAM's (``coords`` with its attributes) plus the
datasets and root attributes the README lists under "Patch files".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fedpath.client.wsi.patching import PatchGrid, read_coords_h5
from fedpath.common.errors import FeatureBagError
from fedpath.common.featurebag import plain_value

PATCH_FILE_VERSION = 1
"""Bumped when the patch file's meaning changes; an older file is then cut again."""


@dataclass(frozen=True)
class PatchFile:
    """The patches of one slide and what the annotation said about each."""

    grid: PatchGrid
    attrs: dict[str, Any]
    patch_labels: np.ndarray | None
    tumour_fraction: np.ndarray | None

    @property
    def annotation_summary(self) -> dict[str, Any] | None:
        """The annotation outcome recorded when the patches were labelled (None: no annotation)."""
        text = self.attrs.get("annotation_summary")
        return json.loads(text) if isinstance(text, str) and text else None

    @property
    def annotation_note(self) -> str | None:
        note = self.attrs.get("annotation_note")
        return note if isinstance(note, str) and note else None


def read_patch_file(path: Path) -> PatchFile:
    """Read a patch file written by ``fedpath prepare``; raises ``FeatureBagError`` if unusable."""
    grid, attrs = read_coords_h5(path)
    try:
        with h5py.File(path, "r") as fh:
            attrs.update({k: plain_value(v) for k, v in fh.attrs.items()})
            labels = np.asarray(fh["patch_labels"][()]) if "patch_labels" in fh else None
            fraction = np.asarray(fh["tumour_fraction"][()]) if "tumour_fraction" in fh else None
    except (OSError, KeyError) as exc:
        raise FeatureBagError(str(path), f"cannot be read as HDF5 ({exc})") from exc
    n = len(grid)
    for name, array in (("patch_labels", labels), ("tumour_fraction", fraction)):
        if array is not None and array.shape != (n,):
            raise FeatureBagError(str(path), f"{name} has shape {array.shape}, coords {n} rows")
    if labels is not None and not np.isin(labels, (-1, 0, 1)).all():
        raise FeatureBagError(str(path), "patch_labels must be -1, 0 or 1")
    if n == 0:
        raise FeatureBagError(str(path), "holds no patches")
    return PatchFile(grid=grid, attrs=attrs, patch_labels=labels, tumour_fraction=fraction)
