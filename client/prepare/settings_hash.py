"""Which settings each output of ``prepare`` depends on, and their hashes.

The hashes are stamped into the feature bags and patch files, and resume compares them with this
run's to decide whether an output is still what this run would write. Only what changes an
output's content is hashed, so a faster engine or another batch size keeps the outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedpath.client.config import PrepareConfig
from fedpath.client.prepare.manifest import ManifestRow
from fedpath.client.prepare.patchfile import PATCH_FILE_VERSION
from fedpath.common.hashing import SAMPLE_SCHEME, sha256_file, sha256_json

if TYPE_CHECKING:  # imported where used: a patch-only run imports no torch
    from fedpath.client.embed.registry import LoadedEncoder


def features_config(cfg: PrepareConfig, encoder: LoadedEncoder, precision: str) -> dict[str, Any]:
    """The settings that change a feature file's content (and nothing that merely changes speed)."""
    from fedpath.client.embed.extract import RESAMPLING

    return {
        "resolution": cfg.resolution.model_dump(mode="json"),
        "tissue": cfg.tissue.model_dump(mode="json"),
        "annotation": cfg.annotation.model_dump(mode="json"),
        "encoder": encoder.spec.id,
        "encoder_sha256": encoder.weights_sha256,
        "precision": precision,
        "feature_dtype": cfg.embedding.feature_dtype,
        "resampling": RESAMPLING,
    }


def patches_config(cfg: PrepareConfig) -> dict[str, Any]:
    """The settings that change a patch file's content: where patches are and how labelled."""
    return {
        "resolution": cfg.resolution.model_dump(mode="json"),
        "tissue": cfg.tissue.model_dump(mode="json"),
        "annotation": cfg.annotation.model_dump(mode="json"),
        "labels": list(cfg.labels),
        "patch_file_version": PATCH_FILE_VERSION,
    }


def patches_config_sha256(cfg: PrepareConfig, row: ManifestRow) -> str:
    """Hash of everything one slide's patch file depends on but the slide file itself."""
    return sha256_json(
        {
            "patches": patches_config(cfg),
            "slide_sample_scheme": SAMPLE_SCHEME,
            "mpp_override": row.mpp,
            "label": row.label,
            "annotation_sha256": sha256_file(row.annotation) if row.annotation else None,
            "annotation_complete": row.annotation_complete,
        }
    )


def slide_config_sha256(site_config: dict[str, Any], row: ManifestRow) -> str:
    """Hash of everything one slide's outputs depend on but its file: site config, the row's
    settings, the annotation's content. The slide file is compared separately (``resume.reuse``)."""
    return sha256_json(
        {
            "site": site_config,
            "slide_sample_scheme": SAMPLE_SCHEME,
            "mpp_override": row.mpp,
            "annotation_sha256": sha256_file(row.annotation) if row.annotation else None,
            "annotation_complete": row.annotation_complete,
        }
    )
