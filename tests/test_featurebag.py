"""Feature-bag format: streamed atomic writes, validation on read, CLAM/TRIDENT compatibility."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from fedpath.common.atomic import TMP_PREFIX
from fedpath.common.errors import FeatureBagError
from fedpath.common.featurebag import FeatureBagWriter, read_attrs, read_feature_bag

ATTRS = {
    "encoder": "tiny_cnn",
    "encoder_sha256": "ab" * 32,
    "feature_dim": 4,
    "patch_size_px": 256,
    "target_mpp": 0.5,
    "slide_id": "s1",
    "config_sha256": "cd" * 32,
}


def _write(path: Path, n: int = 5, blocks: tuple[int, ...] = (3, 2)) -> np.ndarray:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n, 4)).astype(np.float32)
    coords = np.arange(2 * n).reshape(n, 2) * 256
    with FeatureBagWriter(
        path,
        coords=coords,
        feature_dim=4,
        attrs=ATTRS,
        patch_labels=np.array([1, 0, -1, 1, 0][:n]),
        tumour_fraction=np.linspace(0, 1, n),
    ) as writer:
        start = 0
        for size in blocks:
            writer.write(features[start : start + size])
            start += size
    return features


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "s1.h5"
    features = _write(path)
    bag = read_feature_bag(path)
    np.testing.assert_array_equal(bag.features, features)
    assert bag.coords.dtype == np.int64 and bag.coords.shape == (5, 2)
    assert bag.patch_labels is not None and bag.patch_labels.dtype == np.int8
    assert bag.patch_labels.tolist() == [1, 0, -1, 1, 0]
    assert bag.tumour_fraction is not None and bag.tumour_fraction.dtype == np.float32
    assert bag.attrs["fedpath_version"] == "0.1.0"
    assert read_attrs(path)["encoder_sha256"] == "ab" * 32
    assert [p.name for p in tmp_path.iterdir()] == ["s1.h5"]


def test_incomplete_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s1.h5"
    with pytest.raises(FeatureBagError, match="only 3 of 5 rows"):
        _write(path, blocks=(3,))
    assert list(tmp_path.iterdir()) == []


def test_exception_inside_block_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s1.h5"
    with (
        pytest.raises(RuntimeError),
        FeatureBagWriter(path, coords=np.zeros((2, 2)), feature_dim=4, attrs=ATTRS) as writer,
    ):
        writer.write(np.zeros((1, 4)))
        raise RuntimeError("reader died")
    assert list(tmp_path.iterdir()) == []


def test_nan_features_refused_at_write(tmp_path: Path) -> None:
    bad = np.zeros((2, 4), np.float32)
    bad[1, 2] = np.nan
    with (
        pytest.raises(FeatureBagError, match="NaN or Inf"),
        FeatureBagWriter(
            tmp_path / "x.h5", coords=np.zeros((2, 2)), feature_dim=4, attrs=ATTRS
        ) as writer,
    ):
        writer.write(bad)
    assert not any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir())


def test_missing_attrs_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config_sha256"):
        FeatureBagWriter(
            tmp_path / "x.h5",
            coords=np.zeros((1, 2)),
            feature_dim=4,
            attrs={k: v for k, v in ATTRS.items() if k != "config_sha256"},
        )


def test_reads_plain_clam_file(tmp_path: Path) -> None:
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as fh:
        fh["features"] = np.ones((1, 3, 8), np.float32)
        fh["coords"] = np.zeros((1, 3, 2), np.int64)
    bag = read_feature_bag(path)
    assert bag.features.shape == (3, 8) and bag.coords.shape == (3, 2)
    assert bag.patch_labels is None and bag.attrs == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"features": np.ones((3, 4)), "coords": np.zeros((2, 2))}, "does not match N=3"),
        ({"features": np.full((2, 4), np.inf), "coords": np.zeros((2, 2))}, "NaN or Inf"),
        ({"features": np.ones((2, 4))}, "needs datasets"),
        (
            {"features": np.ones((2, 4)), "coords": np.zeros((2, 2)), "patch_labels": [3, 0]},
            "must be -1, 0 or 1",
        ),
    ],
)
def test_invalid_bags_rejected(tmp_path: Path, content: dict, message: str) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as fh:
        for key, value in content.items():
            fh[key] = value
    with pytest.raises(FeatureBagError, match=message):
        read_feature_bag(path)


def test_feature_dim_attribute_must_match(tmp_path: Path) -> None:
    path = tmp_path / "dim.h5"
    with h5py.File(path, "w") as fh:
        fh["features"] = np.ones((2, 4))
        fh["coords"] = np.zeros((2, 2))
        fh.attrs["feature_dim"] = 1024
    with pytest.raises(FeatureBagError, match="feature_dim attribute 1024"):
        read_feature_bag(path)


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "text.h5"
    path.write_text("hello")
    with pytest.raises(FeatureBagError, match="cannot be read as HDF5"):
        read_feature_bag(path)
    with pytest.raises(FeatureBagError, match="cannot be read as HDF5"):
        read_attrs(path)
