"""Loading feature bags into tensors and padding them into batches."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fedpath.client.training.bags import (
    Bag,
    BagSkips,
    SkippedBag,
    bucket_length,
    collate,
    iter_usable_bags,
    load_bag,
    sample_patches,
)
from fedpath.client.training.site_index import BagEntry
from fedpath.common.errors import ConfigError, FeatureBagError
from fedpath.common.featurebag import FeatureBagWriter

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


def _nan_bag(tmp_path: Path, name: str) -> BagEntry:
    entry = _entry(tmp_path, name, 4)
    with h5py.File(entry.features, "r+") as fh:
        fh["features"][2, 1] = np.nan
    return entry


def test_unusable_bags_are_skipped_and_reported_the_others_load(tmp_path: Path) -> None:
    good = [_entry(tmp_path, "good1", 3), _entry(tmp_path, "good2", 5)]
    missing = BagEntry("gone", 0, tmp_path / "gone.h5", None, None, False, None, 3)
    entries = [good[0], _nan_bag(tmp_path, "nan"), missing, good[1]]
    seen: list[SkippedBag] = []
    bags = list(iter_usable_bags(entries, 4, seen.append))
    assert [b.entry.slide_id for b in bags] == ["good1", "good2"]
    assert [s.entry.slide_id for s in seen] == ["nan", "gone"]
    assert seen[0].message == (
        f"slide nan skipped: feature file {tmp_path / 'nan.h5'}: 1 patch(es) have NaN or Inf "
        "features"
    )
    assert seen[1].message == (
        f"slide gone skipped: feature file {tmp_path / 'gone.h5'}: is missing, though "
        "prepared.csv lists it; run `fedpath prepare` again"
    )


def test_skips_without_a_sink_go_to_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ClientApp passes no sink: the reason must still reach the SuperNode's log."""
    bags = list(iter_usable_bags([_nan_bag(tmp_path, "nan"), _entry(tmp_path, "ok", 2)], 4))
    assert [b.entry.slide_id for b in bags] == ["ok"]
    (record,) = caplog.records
    assert record.levelname == "WARNING" and record.name == "fedpath.bags"
    assert record.getMessage().startswith(f"fedpath: slide nan skipped: feature file {tmp_path}")


def test_a_split_with_slides_but_no_usable_one_is_refused(tmp_path: Path) -> None:
    seen: list[SkippedBag] = []
    skips = BagSkips(seen.append)
    assert skips.bags("val", [], 4) == []  # no slides at all is not an error
    entries = [_nan_bag(tmp_path, "n1"), _nan_bag(tmp_path, "n2")]
    with pytest.raises(ConfigError) as info:
        skips.entries("test", entries, 4)
    assert str(info.value) == (
        "the test split has no usable slide: all 2 feature file(s) were skipped, e.g. feature "
        f"file {tmp_path / 'n1.h5'}: 1 patch(es) have NaN or Inf features"
    )
    assert len(skips.skipped) == len(seen) == 2
    assert skips.bags("train", [_entry(tmp_path, "fine", 3)], 4)[0].num_patches == 3


def _plain_file(path: Path, n: int, dim: int, layout: str) -> np.ndarray:
    """A feature file as CLAM or TRIDENT write it: ``features`` + ``coords``, no fedpath
    attributes, no patch labels. CLAM: float32, chunked and resizable, coords attributes.
    TRIDENT: float16 when the encoder ran in half precision, attributes on the datasets."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n, dim)).astype(np.float16 if layout == "trident" else np.float32)
    coords = np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.int64) * 256
    with h5py.File(path, "w") as fh:
        fh.create_dataset("features", data=features, chunks=True, maxshape=(None, dim))
        fh.create_dataset("coords", data=coords, chunks=True, maxshape=(None, 2))
        if layout == "trident":
            fh["features"].attrs["name"] = path.stem
            fh["coords"].attrs["patch_size"] = 256
            fh["coords"].attrs["target_magnification"] = 20
        else:
            fh["coords"].attrs["patch_level"] = 0
            fh["coords"].attrs["patch_size"] = 256
    return features


@pytest.mark.parametrize("layout", ["clam", "trident"])
def test_plain_clam_and_trident_files_load_and_train(tmp_path: Path, layout: str) -> None:
    from fedpath.client.training.trainer import train
    from fedpath.common.mil.config import ModelConfig
    from fedpath.common.mil.models import build_model
    from fedpath.common.train_config import TrainConfig

    bags = []
    for i, n in enumerate((7, 5)):
        path = tmp_path / f"{layout}{i}.h5"
        features = _plain_file(path, n, 8, layout)
        bag = load_bag(BagEntry(path.stem, i, path, None, None, False, None, 0), feature_dim=8)
        assert bag.patch_labels is None and bag.features.dtype == torch.float32
        assert bag.num_patches == n
        torch.testing.assert_close(bag.features, torch.from_numpy(features.astype(np.float32)))
        bags.append(bag)
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_dim=8, hidden_dim=16))
    result = train(model, bags, [], TrainConfig(epochs=1, min_epochs=0))
    assert np.isfinite(result.history[0].train_loss)


def test_bucket_lengths_bound_padding_and_shapes() -> None:
    assert [bucket_length(n) for n in (0, 1, 16, 17, 5000, 7500, 100_000)] == [
        0,
        1,
        16,
        17,
        5120,
        7680,
        102_400,
    ]
    lengths = {bucket_length(n) for n in range(1000, 50_001)}
    assert len(lengths) <= 96  # ~16 per octave: oneDNN's kernel cache keeps up
    assert all(n <= bucket_length(n) <= n * 1.0625 for n in range(1, 70_000))


def test_collate_in_bfloat16_buckets_with_zero_padding(tmp_path: Path) -> None:
    short = load_bag(_entry(tmp_path, "short", 20))
    long = load_bag(_entry(tmp_path, "long", 33))
    batch = collate([short, long], dtype=torch.bfloat16, bucket=True)
    assert batch.features.dtype == torch.bfloat16 and batch.features.shape == (2, 34, 4)
    assert batch.mask.sum(dim=1).tolist() == [20, 33]
    assert batch.features[~batch.mask].abs().sum() == 0
    torch.testing.assert_close(batch.features[1, :33], long.features.bfloat16())
    alone = collate([long], dtype=torch.bfloat16, bucket=True)  # cast and padded: a copy
    assert (
        alone.features.shape == (1, 34, 4) and alone.features.data_ptr() != long.features.data_ptr()
    )
    assert collate([long], bucket=True).features.shape == (1, 34, 4)


def _numbered_bag(n: int, labelled: bool = True) -> Bag:
    """Row i of the features is i everywhere, its patch label i % 2: rows can be traced."""
    entry = BagEntry(
        slide_id="numbered",
        label=1,
        features=Path("numbered.h5"),
        split=None,
        patient_id=None,
        has_patch_labels=labelled,
        annotation_complete=True if labelled else None,
        num_patches=n,
    )
    features = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    labels = (torch.arange(n) % 2).to(torch.int8) if labelled else None
    return Bag(entry, features, labels)


def test_sample_patches_keeps_a_random_ordered_subset_with_its_labels() -> None:
    bag = _numbered_bag(200)
    picked = sample_patches(bag, 32, torch.Generator().manual_seed(0))
    rows = picked.features[:, 0].long()
    assert picked.num_patches == 32 and picked.entry == bag.entry
    assert torch.equal(picked.features, bag.features[rows])
    assert bool((rows[1:] > rows[:-1]).all())  # distinct, in slide order
    assert picked.patch_labels is not None
    assert torch.equal(picked.patch_labels, bag.patch_labels[rows])
    again = sample_patches(bag, 32, torch.Generator().manual_seed(0))
    other = sample_patches(bag, 32, torch.Generator().manual_seed(1))
    assert torch.equal(again.features, picked.features)  # seeded
    assert not torch.equal(other.features, picked.features)
    unlabelled = sample_patches(_numbered_bag(200, labelled=False), 32, torch.Generator())
    assert unlabelled.patch_labels is None and unlabelled.num_patches == 32


def test_sample_patches_leaves_small_bags_and_no_cap_alone() -> None:
    bag = _numbered_bag(40)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert sample_patches(bag, 40, generator) is bag
    assert sample_patches(bag, None, generator) is bag
    assert torch.equal(generator.get_state(), state)  # no random draw spent on them
