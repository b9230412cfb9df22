"""Sources without labels (an image folder without class folders, a CSV without a label column): read for
self-supervised pretraining, refused with the reason by every datamodule that needs labels."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from fmtransfer.data import build_datamodule, load_recipe
from fmtransfer.errors import DataError
from tests.fixtures import make_image_folder, pattern, save_image

LOADER = {"batch_size": 4, "num_workers": 0}


def _flat(root, n=10):
    rng = np.random.default_rng(0)
    for i in range(n):
        save_image(pattern(i % 3, 16, rng, 1), root / f"{i:02d}.png")
    return root


def _folder_recipe(root):
    return load_recipe({"name": "pool", "source": {"kind": "image_folder", "root": str(root)}, "image_size": 16,
                        "channels": 1})


def test_flat_image_folder_is_an_unlabelled_pool(tmp_path):
    dm = build_datamodule(_folder_recipe(_flat(tmp_path / "flat")), LOADER, require_labels=False,
                          output_dir=tmp_path / "out")
    table = dm.prepare()
    assert len(table) == 10 and table.classes is None and (table.targets == -1).all()
    assert "holds images but no class folders" in table.unlabelled
    assert sum(dm.split_sizes().values()) == 10 and dm.summary()["labelled"] is False
    with open(tmp_path / "out" / "data" / "pool.splits.csv") as f:
        assert {row["label"] for row in csv.DictReader(f)} == {""}


def test_unlabelled_pool_is_refused_where_labels_are_needed(tmp_path):
    with pytest.raises(DataError, match=r"'pool' has no labels: data.source.root=.* holds images but no class "
                                        r"folders.*method=dino"):
        build_datamodule(_folder_recipe(_flat(tmp_path / "flat")), LOADER).prepare()


def test_class_folders_keep_their_labels_beside_stray_root_images(tmp_path):
    root = make_image_folder(tmp_path / "tree", per_class=4, size=16)
    _flat(root, n=3)  # images directly in the root are ignored when class folders exist, as before
    table = build_datamodule(_folder_recipe(root), LOADER).prepare()
    assert table.unlabelled is None and table.classes == ["a", "b", "c"] and len(table) == 12


def test_csv_without_label_column_is_an_unlabelled_pool(tmp_path):
    _flat(tmp_path / "images")
    path = tmp_path / "pool.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["path", "region"], *[[f"images/{i:02d}.png", "north"] for i in range(10)]])
    recipe = load_recipe({"name": "pool", "source": {"kind": "csv_manifest", "path": str(path)}, "image_size": 16,
                          "channels": 1})
    table = build_datamodule(recipe, LOADER, require_labels=False).prepare()
    assert len(table) == 10 and set(table.regions) == {"north"} and "no column 'label'" in table.unlabelled
    with pytest.raises(DataError, match=r"no column 'label' \(data.source.columns.label; the header has: path, "
                                        r"region\)"):
        build_datamodule(recipe, LOADER).prepare()
