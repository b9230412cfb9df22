"""Which files a recipe may read: each file once with one label, inside the source's root unless allowed, and
symlink loops listed as skipped instead of hanging or vanishing."""

from __future__ import annotations

import csv
import os
import warnings

import numpy as np
import pytest

from fmtransfer.data import build_table, load_recipe
from fmtransfer.errors import ConfigError, DataError
from tests.fixtures import make_csv_manifest, make_image_folder, save_image


def csv_recipe(path, **source):
    return load_recipe({"name": "m", "source": {"kind": "csv_manifest", "path": str(path), **source},
                        "channels": 3, "image_size": 16, "max_skipped_fraction": 0.1})


def folder_recipe(root, **source):
    return load_recipe({"name": "f", "source": {"kind": "image_folder", "root": str(root), **source},
                        "channels": 1, "image_size": 16, "max_skipped_fraction": 0.1,
                        "split": {"train": 0.5, "val": 0.25, "test": 0.25}})


def add_rows(manifest, *rows):
    with open(manifest, "a", newline="") as f:
        csv.writer(f).writerows(rows)


def quiet_build(recipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_table(recipe)


# --- each file once, with one label -------------------------------------------------------------------------

def test_a_file_listed_twice_is_refused_naming_the_rows(tmp_path):
    manifest = make_csv_manifest(tmp_path)  # 72 rows: lines 2..73
    add_rows(manifest, ["images/north_a_000.png", "a", "north"], ["./images/south_b_003.png", "b", "south"])
    with pytest.raises(DataError) as e:
        build_table(csv_recipe(manifest))
    msg = str(e.value)
    assert "2 file(s) are listed more than once" in msg
    assert "line 2" in msg and "line 74" in msg and "line 75" in msg and "./images/south_b_003.png" in msg


def test_a_file_with_two_labels_is_refused(tmp_path):
    manifest = make_csv_manifest(tmp_path)
    add_rows(manifest, ["images/north_a_000.png", "b", "north"])
    with pytest.raises(DataError, match=r"1 file\(s\) carry more than one label: line 2: images/north_a_000.png "
                                        r"\('a'\) = line 74: images/north_a_000.png \('b'\)"):
        build_table(csv_recipe(manifest))


def test_split_columns_cannot_put_one_file_in_two_splits(tmp_path):
    manifest = make_csv_manifest(tmp_path, with_split=True)
    add_rows(manifest, ["images/north_a_000.png", "a", "north", "train"])  # line 2 has it in test
    with pytest.raises(DataError, match="listed more than once"):
        build_table(csv_recipe(manifest))


def test_duplicate_npz_ids_are_refused(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, images=np.zeros((3, 4, 4), np.uint8), labels=np.arange(3), ids=np.array(["p", "q", "p"]))
    r = load_recipe({"name": "n", "source": {"kind": "npz", "path": str(path)}, "channels": 1, "image_size": 4})
    with pytest.raises(DataError, match=r"id 'p'.*x.npz\[0\].*x.npz\[2\]"):
        build_table(r)


def test_a_folder_symlink_that_names_one_file_twice_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=10)
    os.symlink(root / "a" / "000.png", root / "b" / "alias.png")  # one file, labels a and b
    with pytest.raises(DataError, match=r"carry more than one label.*a/000.png.*b/alias.png"):
        build_table(folder_recipe(root))


# --- inside the root ------------------------------------------------------------------------------------------

def test_manifest_paths_outside_the_root_are_refused(tmp_path):
    manifest = make_csv_manifest(tmp_path / "data")
    outside = save_image(np.zeros((16, 16, 3), np.uint8), tmp_path / "elsewhere" / "x.png")
    add_rows(manifest, [str(outside), "a", "north"], ["../elsewhere/x.png", "b", "south"])
    with pytest.raises(DataError) as e:
        build_table(csv_recipe(manifest))
    msg = str(e.value)
    assert "2 path(s) lie outside" in msg and "line 74" in msg and "line 75" in msg and str(outside) in msg
    assert "data.source.allow_outside_root=true" in msg
    # once allowed, they are read (and the file listed twice, with two labels, is still refused)
    with pytest.raises(DataError, match=r"carry more than one label: line 74: .*elsewhere/x.png \('a'\) = "
                                        r"line 75: ../elsewhere/x.png \('b'\)"):
        build_table(csv_recipe(manifest, allow_outside_root=True))


def test_allow_outside_root_reads_them(tmp_path):
    manifest = make_csv_manifest(tmp_path / "data")
    outside = save_image(np.zeros((16, 16, 3), np.uint8), tmp_path / "elsewhere" / "x.png")
    add_rows(manifest, [str(outside), "a", "north"])
    table = build_table(csv_recipe(manifest, allow_outside_root=True))
    assert str(outside) in set(table.ids) and len(table) == 73


def test_a_symlink_leaving_the_root_is_refused(tmp_path):
    manifest = make_csv_manifest(tmp_path / "data")
    secret = save_image(np.zeros((16, 16, 3), np.uint8), tmp_path / "secret" / "s.png")
    os.symlink(secret, tmp_path / "data" / "images" / "link.png")
    add_rows(manifest, ["images/link.png", "a", "north"])
    with pytest.raises(DataError, match=r"line 74: images/link.png is a symlink to .*secret/s.png"):
        build_table(csv_recipe(manifest))


def test_folder_symlinks_leaving_the_root_are_refused(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=10)
    other = make_image_folder(tmp_path / "other", classes=("c",), per_class=3)
    secret = save_image(np.zeros((16, 16, 1), np.uint8), tmp_path / "secret.png")
    os.symlink(secret, root / "a" / "stolen.png")
    os.symlink(other / "c", root / "d")  # a whole class folder elsewhere
    with pytest.raises(DataError) as e:
        build_table(folder_recipe(root))
    msg = str(e.value)
    assert "2 path(s) lie outside" in msg and "a/stolen.png" in msg and str(root / "d") in msg
    table = build_table(folder_recipe(root, allow_outside_root=True))
    assert table.classes == ["a", "b", "c", "d"] and len(table) == 30 + 1 + 3


def test_folder_symlinks_inside_the_root_are_followed(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=10)
    make_image_folder(root / ".store", classes=("more",), per_class=4, seed=3)
    os.symlink(root / ".store" / "more", root / "a" / "more")
    table = build_table(folder_recipe(root))
    assert len(table) == 34 and "a/more/000.png" in set(table.ids)


def test_allow_outside_root_must_be_a_bool():
    with pytest.raises(ConfigError, match=r"data.source.allow_outside_root='yes'; expected true or false"):
        folder_recipe("/x", allow_outside_root="yes")


# --- symlink loops ----------------------------------------------------------------------------------------------

def test_symlink_loops_in_a_folder_are_skipped_and_listed(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=20)
    os.symlink("loop2.png", root / "a" / "loop1.png")
    os.symlink("loop1.png", root / "a" / "loop2.png")
    os.symlink("..", root / "b" / "up")  # a folder that contains itself
    os.symlink(".", root / "cycle")  # a class folder that is the root
    table = quiet_build(folder_recipe(root))
    assert len(table) == 60 and table.classes == ["a", "b", "c"]
    reasons = {s.id: s.reason for s in table.skipped}
    assert set(reasons) == {"a/loop1.png", "a/loop2.png", "b/up", "cycle"}
    assert all("symlink loop" in r for r in reasons.values())


def test_symlink_loops_in_a_manifest_are_skipped_and_listed(tmp_path):
    manifest = make_csv_manifest(tmp_path, per_class=20)
    os.symlink("l2.png", tmp_path / "images" / "l1.png")
    os.symlink("l1.png", tmp_path / "images" / "l2.png")
    add_rows(manifest, ["images/l1.png", "a", "north"])
    table = quiet_build(csv_recipe(manifest))
    assert len(table) == 120
    [skipped] = table.skipped
    assert skipped.id == "images/l1.png" and "symlink loop" in skipped.reason
