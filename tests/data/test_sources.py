"""Every source kind reads real files; bad input gives clear errors or is skipped and reported."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest

from fmtransfer.data import RecipeDataModule, build_table, load_recipe
from fmtransfer.errors import DataError
from tests.fixtures import corrupt, make_csv_manifest, make_image_folder, make_npz


def folder_recipe(root, **changes):
    base = {"name": "folder", "source": {"kind": "image_folder", "root": str(root)}, "channels": 1,
            "image_size": 16, "split": {"train": 0.5, "val": 0.25, "test": 0.25}}
    return load_recipe({**base, **changes})


@pytest.mark.parametrize("suffix, channels", [(".png", 1), (".jpg", 3), (".tif", 1), (".png", 3)])
def test_image_folder_formats(tmp_path, suffix, channels):
    make_image_folder(tmp_path / "imgs", suffix=suffix, channels=channels)
    table = build_table(folder_recipe(tmp_path / "imgs", channels=channels))
    assert len(table) == 36
    assert table.classes == ["a", "b", "c"]
    assert sorted(np.bincount(table.targets).tolist()) == [12, 12, 12]
    assert table.ids[0].startswith("a/")


def test_grey_and_rgb_files_convert_to_recipe_channels(tmp_path):
    make_image_folder(tmp_path / "imgs", classes=("a",), channels=1)
    make_image_folder(tmp_path / "imgs", classes=("b",), channels=3, seed=1)
    dm = RecipeDataModule(folder_recipe(tmp_path / "imgs", channels=3), batch_size=4)
    x, y, _ = next(iter(dm.dataloader("train")))
    assert x.shape == (4, 3, 16, 16)


def test_multiband_tiff(tmp_path):
    make_image_folder(tmp_path / "bands", channels=6, suffix=".tif")
    dm = RecipeDataModule(folder_recipe(tmp_path / "bands", channels=6, mean=[0.3], std=[0.2]), batch_size=5)
    x, _, _ = next(iter(dm.dataloader("test")))
    assert x.shape == (5, 6, 16, 16)


def test_multiband_into_rgb_is_a_clear_error(tmp_path):
    make_image_folder(tmp_path / "bands", channels=6, suffix=".tif")
    with pytest.raises(DataError, match=r"data.channels=3.*6 channel"):
        build_table(folder_recipe(tmp_path / "bands", channels=3))


def test_region_class_layout(tmp_path):
    make_image_folder(tmp_path / "r", regions=("kenya", "peru"), per_class=6)
    table = build_table(folder_recipe(tmp_path / "r", source={"kind": "image_folder", "root": str(tmp_path / "r"),
                                                               "layout": "region/class"}))
    assert sorted(set(table.regions)) == ["kenya", "peru"]
    assert len(table) == 36


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"data.source.root: folder .*nowhere does not exist"):
        build_table(folder_recipe(tmp_path / "nowhere"))


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        build_table(folder_recipe(tmp_path / "empty"))


def test_unknown_label(tmp_path):
    make_image_folder(tmp_path / "imgs", classes=("a", "b", "weeds"))
    with pytest.raises(DataError) as e:
        build_table(folder_recipe(tmp_path / "imgs", classes=["a", "b"]))
    assert "'weeds'" in str(e.value) and "data.label_map" in str(e.value)


def test_label_map_renames(tmp_path):
    make_image_folder(tmp_path / "imgs", classes=("a", "b", "weeds"))
    table = build_table(folder_recipe(tmp_path / "imgs", classes=["a", "b", "weed"], label_map={"weeds": "weed"}))
    assert table.classes == ["a", "b", "weed"]


def test_corrupt_image_is_skipped_listed_and_warned(tmp_path):
    make_image_folder(tmp_path / "imgs", per_class=40)
    bad = corrupt(tmp_path / "imgs" / "b" / "007.png")
    recipe = folder_recipe(tmp_path / "imgs", max_skipped_fraction=0.05)
    dm = RecipeDataModule(recipe, output_dir=tmp_path / "run")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*007.png"):
        table = dm.prepare()
    assert len(table) == 119 and "b/007.png" not in set(table.ids)
    with open(dm.files["skipped"]) as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["path"] == str(bad) and rows[0]["reason"]
    # every remaining image loads
    assert sum(len(b[0]) for b in dm.dataloader("train")) == dm.split_size("train")


def test_too_many_corrupt_images_stop_the_run(tmp_path):
    make_image_folder(tmp_path / "imgs", per_class=10)
    for i in range(3):
        corrupt(tmp_path / "imgs" / "a" / f"{i:03d}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"3 of 30 images .* data.max_skipped_fraction=0.01"):
            build_table(folder_recipe(tmp_path / "imgs"))


def test_not_an_image_file_is_unreadable(tmp_path):
    make_image_folder(tmp_path / "imgs", per_class=50)
    (tmp_path / "imgs" / "a" / "notes.png").write_text("this is not a picture")
    with pytest.warns(UserWarning, match="notes.png"):
        table = build_table(folder_recipe(tmp_path / "imgs"))
    assert len(table) == 150


def test_csv_manifest_with_regions(tmp_path):
    path = make_csv_manifest(tmp_path)
    r = load_recipe({"name": "m", "source": {"kind": "csv_manifest", "path": str(path)}, "channels": 3,
                     "image_size": 16, "split": {"train": 0.5, "val": 0.25, "test": 0.25}})
    table = build_table(r)
    assert len(table) == 72
    assert sorted(set(table.regions)) == ["north", "south"]


def test_csv_split_column_is_respected(tmp_path):
    path = make_csv_manifest(tmp_path, with_split=True)
    r = load_recipe({"name": "m", "source": {"kind": "csv_manifest", "path": str(path)}, "channels": 3,
                     "image_size": 16})
    table = build_table(r)
    assert {s: int((table.splits == s).sum()) for s in ("train", "val", "test")} == {"train": 36, "val": 18, "test": 18}


def test_csv_missing_file_is_skipped(tmp_path):
    path = make_csv_manifest(tmp_path, per_class=40)
    (tmp_path / "images" / "north_a_003.png").unlink()
    r = load_recipe({"name": "m", "source": {"kind": "csv_manifest", "path": str(path)}, "channels": 3,
                     "image_size": 16})
    with pytest.warns(UserWarning, match="north_a_003.png"):
        table = build_table(r)
    assert len(table) == 239


def test_csv_errors(tmp_path):
    path = make_csv_manifest(tmp_path)
    base = {"name": "m", "channels": 3, "image_size": 16}
    with pytest.raises(DataError, match=r"no column 'file'.*the header has: path, label, region"):
        build_table(load_recipe({**base, "source": {"kind": "csv_manifest", "path": str(path),
                                                    "columns": {"path": "file"}}}))
    with pytest.raises(DataError, match=r"label 'a' is not a number.*regression"):
        build_table(load_recipe({**base, "task": "regression", "source": {"kind": "csv_manifest", "path": str(path)}}))
    with pytest.raises(DataError, match="does not exist"):
        build_table(load_recipe({**base, "source": {"kind": "csv_manifest", "path": str(tmp_path / "no.csv")}}))
    bad = tmp_path / "bad_split.csv"
    bad.write_text("path,label,split\nimages/north_a_000.png,a,holdout\n")
    with pytest.raises(DataError, match=r"bad_split.csv line 2: split='holdout'"):
        build_table(load_recipe({**base, "source": {"kind": "csv_manifest", "path": str(bad)}}))


def test_npz_multiband_and_regression(tmp_path):
    path = make_npz(tmp_path / "x.npz", channels=4, regression=True)
    r = load_recipe({"name": "n", "task": "regression", "source": {"kind": "npz", "path": str(path)},
                     "channels": 4, "image_size": 16})
    dm = RecipeDataModule(r, batch_size=8)
    x, y, _ = next(iter(dm.dataloader("train")))
    assert x.shape == (8, 4, 16, 16) and y.dtype.is_floating_point
    assert dm.num_outputs == 1


def test_npz_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, images=np.zeros((2, 4, 4)), labels=np.array([{"a": 1}, None], dtype=object))
    r = load_recipe({"name": "n", "source": {"kind": "npz", "path": str(path)}, "channels": 1, "image_size": 4})
    with pytest.raises(DataError, match="unpickling"):
        build_table(r)


def test_npz_length_mismatch(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, images=np.zeros((5, 4, 4), dtype=np.uint8), labels=np.arange(4))
    r = load_recipe({"name": "n", "source": {"kind": "npz", "path": str(path)}, "channels": 1, "image_size": 4})
    with pytest.raises(DataError, match="'labels' has 4 entries but there are 5 images"):
        build_table(r)


def test_scan_cache_is_used(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "imgs")
    r = folder_recipe(tmp_path / "imgs")
    first = build_table(r, cache_dir=tmp_path / "cache")
    import fmtransfer.data.images as images

    def fail(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(images, "_scan_one", fail)
    second = build_table(r, cache_dir=tmp_path / "cache")
    assert second.fingerprint == first.fingerprint


def test_a_missing_npz_says_how_to_make_it(tmp_path, monkeypatch):
    """The fashion_mnist and mnist_heldout recipes read a file that scripts/get_real_data.py makes; when it is
    missing the error names the path (under $FMTRANSFER_DATA) and that command."""
    from fmtransfer.config import compose_stage

    monkeypatch.setenv("FMTRANSFER_DATA", str(tmp_path))
    for name in ("fashion_mnist", "mnist_heldout"):
        recipe = load_recipe(compose_stage("evaluate", [f"data={name}", "model=x"]).data)
        with pytest.raises(DataError, match=rf"{tmp_path}/{name}.npz does not exist; make it with: python "
                                            rf"scripts/get_real_data.py --sets {name}"):
            build_table(recipe)
