"""The DataModule serves file recipes through worker processes and keeps epoch order reproducible."""

from __future__ import annotations

import pytest
import torch

from fmtransfer.data import RecipeDataModule, load_recipe
from fmtransfer.data.dataset import EpochSampler
from fmtransfer.errors import ConfigError, DataError
from tests.fixtures import make_image_folder


def test_file_recipe_with_workers(tmp_path):
    make_image_folder(tmp_path / "imgs", per_class=8)
    r = load_recipe({"name": "f", "source": {"kind": "image_folder", "root": str(tmp_path / "imgs")},
                     "channels": 1, "image_size": [12, 20], "split": {"train": 0.5, "val": 0.25, "test": 0.25}})
    dm = RecipeDataModule(r, batch_size=4, num_workers=2)
    loader = dm.dataloader("train", shuffle=True)
    assert loader.num_workers == 2
    seen = [x.shape for x, _, _ in loader]
    assert seen[0] == (4, 1, 12, 20) and len(seen) == 3


def test_epoch_sampler_depends_on_seed_and_epoch_only():
    a, b = EpochSampler(50, seed=7), EpochSampler(50, seed=7)
    a.set_epoch(3)
    list(b)  # history does not matter
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_empty_split_is_a_clear_error():
    r = load_recipe({"name": "tiny", "source": {"kind": "sklearn_digits"}, "channels": 1, "image_size": 8,
                     "limit": 20, "split": {"train": 1.0, "val": 0.0, "test": 0.0}})
    with pytest.raises(DataError, match="no samples in split 'test'"):
        RecipeDataModule(r).dataloader("test")


def test_bad_loader_settings():
    r = load_recipe({"name": "tiny", "source": {"kind": "sklearn_digits"}, "channels": 1, "image_size": 8})
    with pytest.raises(ConfigError, match="loader.batch_size"):
        RecipeDataModule(r, batch_size=0)
    with pytest.raises(ConfigError, match="loader.num_workers"):
        RecipeDataModule(r, num_workers="many").dataloader("train")


def test_normalisation_applied():
    r = load_recipe({"name": "d", "source": {"kind": "sklearn_digits"}, "channels": 1, "image_size": 8,
                     "mean": [0.5], "std": [0.5]})
    x = RecipeDataModule(r, batch_size=2000).dataset("train").images
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6 and torch.isclose(x.min(), torch.tensor(-1.0))
