"""Configs: strict validation, defaults of the design, readable errors, TOML + overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fedpath.client.config import (
    AnnotationConfig,
    EmbeddingConfig,
    PrepareConfig,
    ResolutionConfig,
    TissueConfig,
)
from fedpath.common.configio import build_config, deep_merge
from fedpath.common.errors import ConfigError


def test_design_defaults() -> None:
    cfg = PrepareConfig()
    assert cfg.resolution.target_mpp == 0.5 and cfg.resolution.patch_size == 256
    assert cfg.resolution.step == 256
    assert cfg.tissue.seg_downsample == 64 and cfg.tissue.median_kernel == 7
    assert cfg.tissue.saturation_threshold == 8 and cfg.tissue.closing_px == 4
    assert cfg.tissue.min_tissue_area == 100 and cfg.tissue.max_hole_area == 16
    assert cfg.tissue.min_tissue_fraction == 0.25
    assert cfg.embedding.encoder == "efficientnet_lite0" and cfg.embedding.batch_size == 8
    assert TissueConfig.preset("biopsy").min_tissue_area == 1


@pytest.mark.parametrize(
    ("factory", "kwargs"),
    [
        (ResolutionConfig, {"target_mpp": 0}),
        (ResolutionConfig, {"patch_size": 256, "overlap": 256}),
        (TissueConfig, {"median_kernel": 6}),
        (TissueConfig, {"min_tissue_fraction": 1.5}),
        (AnnotationConfig, {"positive_fraction": 0.2, "negative_fraction": 0.3}),
        (EmbeddingConfig, {"precision": "float64"}),
        (EmbeddingConfig, {"device": "gpu"}),
        (EmbeddingConfig, {"backend": "tensorrt"}),
        (EmbeddingConfig, {"batchsize": 3}),
    ],
)
def test_invalid_values_are_refused(factory: type, kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        factory(**kwargs)


def test_configs_are_frozen() -> None:
    cfg = ResolutionConfig()
    with pytest.raises(ValidationError):
        cfg.target_mpp = 1.0  # type: ignore[misc]


def test_deep_merge_overrides_and_skips_none() -> None:
    merged = deep_merge({"a": {"x": 1, "y": 2}, "b": 3}, {"a": {"y": 5, "z": None}, "b": None})
    assert merged == {"a": {"x": 1, "y": 5}, "b": 3}


def test_toml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "prepare.toml"
    path.write_text('[resolution]\ntarget_mpp = 1.0\n[embedding]\nencoder = "tiny_cnn"\n')
    cfg = build_config(PrepareConfig, path, {"embedding": {"batch_size": 8}})
    assert cfg.resolution.target_mpp == 1.0
    assert cfg.embedding.encoder == "tiny_cnn" and cfg.embedding.batch_size == 8


def test_toml_errors_name_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "prepare.toml"
    path.write_text("[tissue]\nsaturation_threshhold = 9\nmin_tissue_fraction = 2\n")
    with pytest.raises(ConfigError) as info:
        build_config(PrepareConfig, path)
    text = str(info.value)
    assert f"{path}: tissue.saturation_threshhold: unknown setting" in text
    assert f"{path}: tissue.min_tissue_fraction: Input should be less than or equal to 1" in text
    bad = tmp_path / "bad.toml"
    bad.write_text("[tissue\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_config(PrepareConfig, bad)
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(PrepareConfig, tmp_path / "missing.toml")
