"""The training benchmarks' synthetic feature cohort, written once as real feature-bag files.

1,280-d float32 features written with the project's writer (``FeatureBagWriter``) and read
with its loader (``load_bag``), as ``fedpath local train`` reads them. Features are N(0, 1)
with a per-slide offset; in a tumour slide 5-30 % of the patches carry a fixed "tumour
direction" (norm ``SIGNAL``); every tenth slide has complete patch labels, so mixed
supervision runs as shipped. Cached under ``bench/_cache/training/``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpath.client.training.site_index import BagEntry
from fedpath.common.featurebag import FeatureBagWriter

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / "_cache" / "training"
DIM = 1280
SIGNAL = 2.0
"""Norm of the tumour direction added to tumour patches (per-feature noise is N(0, 1)):
learnable in a few epochs, not so easy that every arm saturates at once."""


@dataclass(frozen=True)
class Scale:
    """Cohort and run sizes of one benchmark mode."""

    name: str
    n_train: int
    n_val: int
    mean_patches: int
    big_bag: int
    epochs: int


FULL = Scale("full", 200, 40, 5000, 100_000, 4)
QUICK = Scale("quick", 24, 8, 500, 10_000, 2)


ATTRS = {
    "encoder": "synthetic",
    "encoder_sha256": "0" * 64,
    "feature_dim": DIM,
    "patch_size_px": 256,
    "target_mpp": 0.5,
}


def _direction() -> np.ndarray:
    u = np.random.default_rng(12345).standard_normal(DIM).astype(np.float32)
    return u / np.linalg.norm(u)


def _write_bag(
    path: Path,
    slide_id: str,
    n: int,
    tumour: bool,
    labelled: bool,
    rng: np.random.Generator,
    config_sha: str,
) -> None:
    """One synthetic slide, streamed in blocks through the project's writer."""
    offset = 0.3 * rng.standard_normal(DIM, dtype=np.float32)
    positive = np.zeros(n, dtype=bool)
    if tumour:
        k = max(1, int(rng.uniform(0.05, 0.3) * n))
        positive[rng.choice(n, k, replace=False)] = True
    labels = positive.astype(np.int8) if labelled else None
    signal = SIGNAL * _direction()
    coords = np.stack([np.arange(n) % 256, np.arange(n) // 256], axis=1) * 256
    attrs = {**ATTRS, "slide_id": slide_id, "config_sha256": config_sha}
    with FeatureBagWriter(
        path, coords=coords, feature_dim=DIM, attrs=attrs, patch_labels=labels
    ) as writer:
        for start in range(0, n, 4096):
            stop = min(n, start + 4096)
            block = rng.standard_normal((stop - start, DIM), dtype=np.float32)
            block += offset
            block[positive[start:stop]] += signal
            writer.write(block)


def _entry(directory: Path, spec: dict[str, Any]) -> BagEntry:
    return BagEntry(
        slide_id=spec["slide_id"],
        label=spec["label"],
        features=directory / f"{spec['slide_id']}.h5",
        split=spec["split"],
        patient_id=None,
        has_patch_labels=spec["labelled"],
        annotation_complete=True if spec["labelled"] else None,
        num_patches=spec["n"],
    )


def ensure_cohort(scale: Scale) -> tuple[list[BagEntry], list[BagEntry]]:
    """Write the cohort once (train and val feature bags plus an index); reuse it afterwards."""
    recipe = {
        "n_train": scale.n_train,
        "n_val": scale.n_val,
        "mean": scale.mean_patches,
        "dim": DIM,
        "signal": SIGNAL,
        "version": 1,
    }
    sha = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    directory = CACHE / f"cohort-{scale.name}-{sha[:10]}"
    index = directory / "index.json"
    if not index.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        print(f"writing the {scale.name} cohort to {directory} ...", flush=True)
        began = time.perf_counter()
        specs: list[dict[str, Any]] = []
        for split, count, seed in (("train", scale.n_train, 1), ("val", scale.n_val, 2)):
            rng = np.random.default_rng(seed)
            low, high = scale.mean_patches // 2, scale.mean_patches * 3 // 2
            lengths = rng.permutation(np.linspace(low, high, count).round().astype(int))
            for i in range(count):
                labelled = split == "val" or i % 10 < 2  # val: all, for patch AUC
                spec = {
                    "slide_id": f"{split}{i:03d}",
                    "label": i % 2,
                    "split": split,
                    "labelled": labelled,
                    "n": int(lengths[i]),
                }
                _write_bag(
                    directory / f"{spec['slide_id']}.h5",
                    spec["slide_id"],
                    spec["n"],
                    spec["label"] == 1,
                    labelled,
                    rng,
                    sha,
                )
                specs.append(spec)
        index.write_text(json.dumps(specs, indent=1))
        print(f"  written in {time.perf_counter() - began:.0f} s", flush=True)
    specs = json.loads(index.read_text())
    entries = [_entry(directory, s) for s in specs]
    return [e for e in entries if e.split == "train"], [e for e in entries if e.split == "val"]


def ensure_big_bag(n: int) -> BagEntry:
    """One tumour slide of ``n`` patches (512 MB at 100,000), cached."""
    directory = CACHE / "big"
    directory.mkdir(parents=True, exist_ok=True)
    spec = {"slide_id": f"big{n}", "label": 1, "split": "train", "labelled": True, "n": n}
    entry = _entry(directory, spec)
    if not entry.features.is_file():
        print(f"writing a {n:,}-patch bag ...", flush=True)
        rng = np.random.default_rng(3)
        _write_bag(entry.features, spec["slide_id"], n, True, True, rng, "2" * 64)
    return entry
