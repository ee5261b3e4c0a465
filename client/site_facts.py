"""A prepared site's ``site.json``: read it, and reduce it to what may leave the hospital.

Kept free of torch, h5py and scikit-learn: the harmonisation query of every federated run runs
this in a fresh ClientApp process, which should cost a JSON read, not a deep-learning import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedpath.client.prepare.records import PATCH_INDEX_FILE, SITE_FILE
from fedpath.common.errors import ConfigError

__all__ = ["read_site", "site_facts"]


def read_site(data_dir: Path) -> dict[str, Any]:
    """The prepared site's ``site.json``; ``ConfigError`` when missing or unusable."""
    path = data_dir / SITE_FILE
    if not path.is_file() and (data_dir / PATCH_INDEX_FILE).is_file():
        raise ConfigError(
            f"{data_dir} holds patches only ({PATCH_INDEX_FILE}: cut with `fedpath prepare "
            "--patch-only`), no features yet: run `fedpath prepare` without --patch-only on "
            "the same --out to embed them"
        )
    if not path.is_file():
        raise ConfigError(
            f"{data_dir} is not a prepared site: {SITE_FILE} is missing (run `fedpath prepare`)"
        )
    try:
        site = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(site, dict) or not isinstance(site.get("feature_dim"), int):
        raise ConfigError(f"{path}: has no integer feature_dim")
    return site


def site_facts(data_dir: Path, site: str) -> dict[str, Any]:
    """The aggregate facts the harmonisation gate compares: no slide ids, no file names."""
    info = read_site(data_dir)
    slides = info.get("slides") if isinstance(info.get("slides"), dict) else {}
    return {
        "site": site,
        "fedpath_version": info.get("fedpath_version"),
        "encoder": info.get("encoder"),
        "encoder_sha256": info.get("encoder_sha256"),
        "feature_dim": info.get("feature_dim"),
        "target_mpp": info.get("target_mpp"),
        "patch_size": info.get("patch_size"),
        "labels": info.get("labels"),
        "slides": {
            "usable": int(slides.get("usable", 0)),
            "by_label": dict(slides.get("by_label", {})),
            "with_patch_labels": int(slides.get("with_patch_labels", 0)),
        },
    }
