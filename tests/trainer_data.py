"""Tiny synthetic bags, a small model and a quick training config, shared by the trainer tests.

Tumour bags carry a few patches shifted by +2 in their first features, so a model learns the
task in a handful of epochs on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedpath.client.training.bags import Bag
from fedpath.client.training.site_index import BagEntry
from fedpath.common.mil.config import ModelConfig
from fedpath.common.mil.models import MILModel, build_model
from fedpath.common.train_config import TrainConfig

DIM = 16


def toy_bags(n: int, seed: int, flip: bool = False) -> list[Bag]:
    """``n`` bags, alternating normal/tumour; tumour bags have 3-8 patches shifted by +2.

    Every third tumour and every third normal bag carries complete patch labels. ``flip``
    inverts the slide labels (features unchanged): a validation set that gets worse as the
    model learns the real task.
    """
    g = torch.Generator().manual_seed(seed)
    bags: list[Bag] = []
    for i in range(n):
        label = i % 2
        size = int(torch.randint(20, 61, (1,), generator=g))
        features = torch.randn(size, DIM, generator=g)
        patch = torch.zeros(size, dtype=torch.int8)
        if label == 1:
            k = int(torch.randint(3, 9, (1,), generator=g))
            features[:k, :4] += 2.0
            patch[:k] = 1
        labelled = (i // 2) % 3 == 0
        entry = BagEntry(
            slide_id=f"s{seed}_{i}",
            label=1 - label if flip else label,
            features=Path(f"synthetic/s{i}.h5"),
            split=None,
            patient_id=None,
            has_patch_labels=labelled,
            annotation_complete=True if labelled else None,
            num_patches=size,
        )
        bags.append(Bag(entry, features, patch if labelled else None))
    return bags


TRAIN = toy_bags(24, seed=1)
VAL = toy_bags(12, seed=2)


def toy_model(kind: str = "clam_sb", seed: int = 0, dropout: float = 0.25) -> MILModel:
    torch.manual_seed(seed)
    return build_model(ModelConfig(kind=kind, feature_dim=DIM, hidden_dim=32, dropout=dropout))


def train_cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = {"epochs": 6, "lr": 2e-3, "min_epochs": 0, "patience": 100}
    base.update(kw)
    return TrainConfig.model_validate(base)


def forward_lengths(model: MILModel) -> list[tuple[bool, int]]:
    """(training?, padded bag length) of every forward pass the model runs from now on."""
    seen: list[tuple[bool, int]] = []
    model.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].shape[1])))
    return seen
