"""One read per bag: evaluation's single pass and the resident worker's bag cache.

The cache must never serve a bag whose file changed, must stay under its byte cap, and must
run the same checks on a hit as on a read; evaluation must read each file once, skipped
files included, and still report what it skipped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from fedpath.client.training import bags as bags_module
from fedpath.client.training.bag_cache import (
    DEFAULT_CAP_BYTES,
    BagCache,
    cap_from_node_config,
    use_bag_cache,
)
from fedpath.client.training.bags import SkippedBag, load_bag
from fedpath.client.training.site_index import BagEntry, load_site_index
from fedpath.common.errors import ConfigError, FeatureBagError
from fedpath.common.featurebag import read_feature_bag
from fedpath.synthetic.site import ENCODER_SHA, SyntheticSiteSpec, write_synthetic_site

SPEC = SyntheticSiteSpec(n_slides=10, feature_dim=8, patches=(12, 12))
DIM = SPEC.feature_dim


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_synthetic_site(tmp_path / "a", SPEC, seed=0)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Every feature file the bag loaders open, in order."""
    seen: list[Path] = []

    def counting(path: Path, **kwargs: object) -> object:
        seen.append(Path(path))
        return read_feature_bag(path, **kwargs)

    monkeypatch.setattr(bags_module, "read_feature_bag", counting)
    yield seen


def _entries(site: Path) -> list[BagEntry]:
    return load_site_index(site, ("normal", "tumour"))


def _rewrite(path: Path, scale: float) -> None:
    """Replace the file as fedpath does: a new file renamed over the old one."""
    with h5py.File(path, "r") as fh:
        datasets = {name: fh[name][()] for name in fh}
        attrs = dict(fh.attrs)
    datasets["features"] = datasets["features"] * scale
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as fh:
        for name, value in datasets.items():
            fh[name] = value
        fh.attrs.update(attrs)
    os.replace(tmp, path)


def test_evaluation_reads_each_bag_once_and_reports_the_skipped_one(
    site: Path, reads: list[Path]
) -> None:
    from fedpath.client.federated import evaluate_on_site, load_splits
    from fedpath.common.federation import RoundInstructions
    from fedpath.server.config import RunConfig
    from fedpath.server.federated_run import initial_arrays

    cfg = RunConfig.from_run_config({"local-epochs": 1})
    instructions = RoundInstructions(
        server_round=1,
        model=cfg.model_config_for(DIM),
        train=cfg.train_config(),
        eval_split="test",
    )
    test = load_splits(site, instructions).test
    assert len(test) >= 2
    bad = test[0].features
    with h5py.File(bad, "r+") as fh:
        fh["features"][1, 0] = math.nan
    seen: list[SkippedBag] = []
    metrics = evaluate_on_site(site, instructions, initial_arrays(cfg, DIM), on_skip=seen.append)
    assert sorted(reads) == sorted(e.features for e in test), "a bag was read twice"
    assert metrics["num-examples"] == len(test) - 1 and metrics["skipped-slides"] == 1
    assert [s.entry.features for s in seen] == [bad]
    assert seen[0].message.startswith(f"slide {test[0].slide_id} skipped: feature file {bad}: ")


def test_a_cached_bag_is_served_until_its_file_changes(site: Path, reads: list[Path]) -> None:
    entry = _entries(site)[0]
    cache = BagCache()
    with use_bag_cache(cache):
        first = load_bag(entry, DIM)
        second = load_bag(entry, DIM)
        assert reads == [entry.features] and cache.hits == 1
        assert second.features is first.features and second.entry is entry

        _rewrite(entry.features, scale=2.0)
        third = load_bag(entry, DIM)
        assert len(reads) == 2, "a rewritten file was served from the cache"
        assert np.allclose(third.features.numpy(), 2.0 * first.features.numpy())

        with h5py.File(entry.features, "r+") as fh:  # edited in place: same inode and size
            fh["features"][0, 0] = 123.0
        info = entry.features.stat()  # coarse file-system clocks: make the write's time visible
        os.utime(entry.features, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
        assert float(load_bag(entry, DIM).features[0, 0]) == 123.0
        assert len(reads) == 3
    load_bag(entry, DIM)  # outside the block: no cache
    assert len(reads) == 4


def test_a_hit_is_checked_against_the_caller_like_a_read(site: Path) -> None:
    entry = _entries(site)[0]
    cache = BagCache()
    with use_bag_cache(cache):
        load_bag(entry, DIM)
        with pytest.raises(FeatureBagError, match=f"has {DIM}-d features but the model expects"):
            load_bag(entry, DIM + 1)
        other = BagEntry(**{**entry.__dict__, "encoder_sha256": "0" * 64})
        with pytest.raises(FeatureBagError, match="was embedded with encoder weights sha256"):
            load_bag(other, DIM)
        assert entry.encoder_sha256 == ENCODER_SHA and load_bag(entry, DIM).num_patches == 12
        entry.features.unlink()
        with pytest.raises(FeatureBagError, match="is missing"):
            load_bag(entry, DIM)
    assert cache.hits == 3


def test_the_cache_stays_under_its_cap_evicting_the_least_recently_used(
    site: Path, reads: list[Path]
) -> None:
    entries = [e for e in _entries(site) if not e.has_patch_labels][:3]
    size = load_bag(entries[0], DIM).features.nbytes  # each of these: 12 x 8 float32, no labels
    cache = BagCache(cap_bytes=2 * size + size // 2)
    with use_bag_cache(cache):
        load_bag(entries[0], DIM)
        load_bag(entries[1], DIM)
        load_bag(entries[0], DIM)  # entries[1] is now the least recently used
        load_bag(entries[2], DIM)
        assert len(cache) == 2 and cache.nbytes <= cache.cap_bytes and cache.evictions == 1
        reads.clear()
        load_bag(entries[0], DIM)
        load_bag(entries[2], DIM)
        assert reads == []
        load_bag(entries[1], DIM)
        assert reads == [entries[1].features]
    tiny = BagCache(cap_bytes=size - 1)
    with use_bag_cache(tiny):
        load_bag(entries[0], DIM)
    assert len(tiny) == 0 and tiny.nbytes == 0


def test_a_new_run_or_a_smaller_cap_empties_the_cache(site: Path) -> None:
    entries = _entries(site)[:2]
    cache = BagCache()
    cache.begin(run_id=1, cap_bytes=DEFAULT_CAP_BYTES)
    with use_bag_cache(cache):
        for entry in entries:
            load_bag(entry, DIM)
    cache.begin(run_id=1, cap_bytes=DEFAULT_CAP_BYTES)
    assert len(cache) == 2
    cache.begin(run_id=1, cap_bytes=cache.nbytes - 1)
    assert len(cache) == 1
    cache.begin(run_id=2, cap_bytes=DEFAULT_CAP_BYTES)
    assert len(cache) == 0 and cache.nbytes == 0


def test_the_cap_comes_from_the_node_config() -> None:
    assert cap_from_node_config({}) == DEFAULT_CAP_BYTES == 512 * 2**20
    assert cap_from_node_config({"bag-cache-mib": 64}) == 64 * 2**20
    assert cap_from_node_config({"bag-cache-mib": 0}) == 0
    for bad in (-1, "big", True, math.inf):
        with pytest.raises(ConfigError, match="bag-cache-mib"):
            cap_from_node_config({"bag-cache-mib": bad})


def _evaluate_request(site: Path, node_config: dict) -> tuple[dict, list[bytes]]:
    from fedpath.client.worker_protocol import PROTOCOL_VERSION, context_to_wire, records_to_wire
    from fedpath.server.config import RunConfig
    from fedpath.server.federated_run import initial_arrays

    cfg = RunConfig.from_run_config({"local-epochs": 1})
    instructions = {
        "server_round": 1,
        "model": cfg.model_config_for(DIM).model_dump(mode="json"),
        "train": cfg.train_config().model_dump(mode="json"),
        "eval_split": "val",
    }
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in initial_arrays(cfg, DIM).items()}),
            "config": ConfigRecord({"instructions": json.dumps(instructions)}),
        }
    )
    context = Context(
        run_id=5,
        node_id=7,
        node_config={"data-path": str(site), "site": "a", **node_config},
        state=RecordDict(),
        run_config={},
    )
    blobs: list[bytes] = []
    header = {
        "version": PROTOCOL_VERSION,
        "op": "evaluate",
        "content": records_to_wire(content, blobs),
        "context": context_to_wire(context, blobs),
    }
    return header, blobs


def test_the_worker_serves_a_runs_second_read_from_its_cache(site: Path, reads: list[Path]) -> None:
    from fedpath.client.app import CONTENT_HANDLERS
    from fedpath.client.worker import handle_request

    cache = BagCache()
    header, blobs = _evaluate_request(site, {})
    first, _ = handle_request(header, blobs, CONTENT_HANDLERS, bag_cache=cache)
    n_val = len(reads)
    second, _ = handle_request(header, blobs, CONTENT_HANDLERS, bag_cache=cache)
    assert first["ok"] and second["ok"] and n_val > 0
    assert len(reads) == n_val and cache.hits == n_val
    assert (
        first["content"] != {}
        and first["content"]["metrics"]["metrics"]["auc"]
        == (second["content"]["metrics"]["metrics"]["auc"])
    )

    off, _ = handle_request(
        *_evaluate_request(site, {"bag-cache-mib": 0}), CONTENT_HANDLERS, bag_cache=cache
    )
    assert off["ok"] and len(cache) == 0 and len(reads) == 2 * n_val
    bad, _ = handle_request(
        *_evaluate_request(site, {"bag-cache-mib": -3}), CONTENT_HANDLERS, bag_cache=cache
    )
    assert not bad["ok"] and bad["kind"] == "expected" and "bag-cache-mib" in bad["message"]
