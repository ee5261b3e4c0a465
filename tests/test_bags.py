"""Loading feature bags into tensors and padding them into batches."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from client.training.bags import collate, load_bag
from client.training.site_index import BagEntry
from common.errors import FeatureBagError
from common.featurebag import FeatureBagWriter

ATTRS = {
    "encoder": "tiny_cnn",
    "encoder_sha256": "0" * 64,
    "patch_size_px": 256,
    "target_mpp": 0.5,
    "config_sha256": "1" * 64,
}


def _entry(tmp_path: Path, name: str, n: int, dim: int = 4, labels: bool = False) -> BagEntry:
    path = tmp_path / f"{name}.h5"
    rng = np.random.default_rng(n)
    patch_labels = np.where(np.arange(n) % 3 == 0, 1, 0) if labels else None
    with FeatureBagWriter(
        path,
        coords=np.zeros((n, 2)),
        feature_dim=dim,
        attrs={**ATTRS, "feature_dim": dim, "slide_id": name},
        patch_labels=patch_labels,
    ) as writer:
        writer.write(rng.normal(size=(n, dim)))
    return BagEntry(name, int(labels), path, None, None, labels, labels or None, n)


def test_load_and_collate_pads_with_mask(tmp_path: Path) -> None:
    short = load_bag(_entry(tmp_path, "short", 3, labels=True), feature_dim=4)
    long = load_bag(_entry(tmp_path, "long", 5))
    assert short.patch_labels is not None and short.patch_labels.tolist() == [1, 0, 0]
    batch = collate([short, long])
    assert batch.features.shape == (2, 5, 4) and batch.mask.tolist() == [
        [True, True, True, False, False],
        [True] * 5,
    ]
    torch.testing.assert_close(batch.features[0, :3], short.features)
    assert batch.features[0, 3:].abs().sum() == 0
    assert batch.labels.tolist() == [1, 0] and batch.slide_ids == ("short", "long")
    assert batch.annotation_complete == (True, None)


def test_single_bag_needs_no_padding_copy(tmp_path: Path) -> None:
    bag = load_bag(_entry(tmp_path, "one", 6))
    batch = collate([bag])
    assert batch.features.shape == (1, 6, 4) and bool(batch.mask.all())
    assert batch.features.data_ptr() == bag.features.data_ptr()  # a view, not a copy


def test_wrong_width_and_empty_bags_refused(tmp_path: Path) -> None:
    entry = _entry(tmp_path, "w", 3, dim=4)
    with pytest.raises(FeatureBagError, match="expects 1280-d"):
        load_bag(entry, feature_dim=1280)
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as fh:
        fh["features"] = np.zeros((0, 4), np.float32)
        fh["coords"] = np.zeros((0, 2), np.int64)
    with pytest.raises(FeatureBagError, match="no patches"):
        load_bag(BagEntry("e", 0, empty, None, None, False, None, 0))
    with pytest.raises(ValueError, match="empty list"):
        collate([])
