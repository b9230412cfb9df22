"""The decoder trusts no file: a pixel cap read from the header before decoding, colour models honoured
(CMYK, palette, min-is-white, bands that are not colour) and a stated rule for float values.

Hashing and the scan cache are covered in tests/test_faults.py."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

from fmtransfer.data import build_table, load_recipe
from fmtransfer.data.images import (
    DEFAULT_MAX_PIXELS,
    ChannelMismatch,
    ImageTooLarge,
    UnreadableImage,
    read_image,
    read_raw,
    scan_images,
)
from fmtransfer.errors import ConfigError, DataError
from tests.conftest import read_yaml
from tests.fixtures import make_image_folder, save_image


def folder_recipe(root, **changes):
    base = {"name": "folder", "source": {"kind": "image_folder", "root": str(root)}, "channels": 1,
            "image_size": 16, "split": {"train": 0.5, "val": 0.25, "test": 0.25}}
    return load_recipe({**base, **changes})


def _no_decoding(monkeypatch):
    """Make every pixel decoder fail loudly, so a test sees whether a file was refused from its header."""
    def boom(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", boom)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", boom)


# --- pixel cap ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_pixel_cap_refuses_from_the_header(tmp_path, monkeypatch, suffix):
    path = save_image(np.zeros((40, 50, 3), np.uint8), tmp_path / f"big{suffix}")
    _no_decoding(monkeypatch)
    with pytest.raises(ImageTooLarge) as e:
        read_raw(path, max_pixels=1999)
    assert "50x40" in str(e.value) and "2,000 pixels" in str(e.value) and "1,999" in str(e.value)
    assert isinstance(e.value, UnreadableImage)  # skipped and listed like a corrupt file


def test_pixel_cap_refuses_a_zlib_bomb_tiff_without_decoding(tmp_path, monkeypatch):
    """A 10240x10240 zlib TIFF of zeros is ~100 KB on disk and 105 MB decoded: the default cap refuses it."""
    path = tmp_path / "bomb.tif"
    tile = np.zeros((1024, 1024), np.uint8)
    tifffile.imwrite(path, shape=(10240, 10240), dtype=np.uint8, tile=(1024, 1024), compression="zlib",
                     data=(tile for _ in range(100)))
    assert path.stat().st_size < 2_000_000
    _no_decoding(monkeypatch)
    with pytest.raises(ImageTooLarge, match="10240x10240"):
        read_raw(path)


def test_pixel_cap_files_are_skipped_and_named(tmp_path):
    make_image_folder(tmp_path / "imgs", per_class=40)  # 16x16 = 256 pixels each
    big = save_image(np.zeros((40, 40, 1), np.uint8), tmp_path / "imgs" / "a" / "huge.png")
    with pytest.warns(UserWarning, match=r"huge.png.*40x40"):
        table = build_table(folder_recipe(tmp_path / "imgs", max_pixels=1000, max_skipped_fraction=0.05))
    assert len(table) == 120
    [skipped] = table.skipped
    assert skipped.where == str(big)
    assert "40x40" in skipped.reason and "1,600 pixels" in skipped.reason and "data.max_pixels=1000" in skipped.reason


def test_max_pixels_default_lives_in_the_yaml_and_reaches_users_recipes():
    from fmtransfer.config import config_dir

    for name in ("image_folder", "csv_manifest"):
        assert read_yaml(config_dir() / "data" / f"{name}.yaml")["max_pixels"] == DEFAULT_MAX_PIXELS
    assert folder_recipe("/x").max_pixels == DEFAULT_MAX_PIXELS == 8192 * 8192
    for bad in (0, -5, 1.5, "big"):
        with pytest.raises(ConfigError, match="data.max_pixels"):
            folder_recipe("/x", max_pixels=bad)


# --- colour models ------------------------------------------------------------------------------------------

def test_cmyk_tiff_is_converted_to_rgb_as_pillow_does(tmp_path):
    """Pure red in CMYK (no cyan, full magenta and yellow) must be red, not cyan."""
    rng = np.random.default_rng(0)
    cmyk = rng.integers(0, 256, size=(6, 7, 4), dtype=np.uint8)
    cmyk[0, 0] = (0, 255, 255, 0)
    path = tmp_path / "cmyk.tif"
    tifffile.imwrite(path, cmyk, photometric="separated")
    rgb = read_raw(path)
    assert rgb.shape == (6, 7, 3) and tuple(rgb[0, 0]) == (255, 0, 0)
    pillow = np.asarray(Image.fromarray(cmyk, mode="CMYK").convert("RGB")).astype(int)
    assert np.abs(rgb.astype(int) - pillow).max() <= 1
    assert np.allclose(read_image(path, 3)[0, 0], [1.0, 0.0, 0.0])
    # 16-bit CMYK follows the same rule on its own range
    tifffile.imwrite(path, cmyk.astype(np.uint16) * 257, photometric="separated")
    assert np.allclose(read_image(path, 3), pillow / 255.0, atol=1.01 / 255)
    # CMYK JPEGs (Pillow's CMYK mode) follow the same rule
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    rgb = read_image(tmp_path / "cmyk.jpg", 3)
    assert rgb.shape == (8, 8, 3) and rgb[4, 4, 0] > 0.9 and rgb[4, 4, 1:].max() < 0.1


def test_bands_that_are_not_colour_do_not_convert(tmp_path):
    """A 4-band TIFF without an alpha band (RGB + NIR, say) is not RGBA: dropping a band would be a guess."""
    bands = np.arange(8 * 8 * 4, dtype=np.uint8).reshape(8, 8, 4)
    path = tmp_path / "rgbn.tif"
    tifffile.imwrite(path, bands, photometric="minisblack", planarconfig="contig")
    with pytest.raises(ChannelMismatch, match=r"4 channel\(s\).*not colour"):
        read_image(path, 3)
    with pytest.raises(ChannelMismatch, match="not colour"):
        read_image(path, 1)
    assert read_image(path, 4).shape == (8, 8, 4)
    tifffile.imwrite(path, bands, photometric="rgb", extrasamples=["unspecified"])
    with pytest.raises(ChannelMismatch, match="not colour"):
        read_image(path, 3)
    # a real alpha band is dropped, as for RGBA PNGs
    tifffile.imwrite(path, bands, photometric="rgb", extrasamples=["unassalpha"])
    assert np.array_equal(read_image(path, 3), bands[..., :3] / np.float32(255))


def test_palette_and_min_is_white_tiffs(tmp_path):
    index = np.array([[0, 1], [2, 1]], np.uint8)
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, 1] = (65535, 0, 0)
    colormap[:, 2] = (0, 0, 65535)
    tifffile.imwrite(tmp_path / "p.tif", index, photometric="palette", colormap=colormap)
    rgb = read_image(tmp_path / "p.tif", 3)
    assert np.allclose(rgb[0, 1], [1, 0, 0]) and np.allclose(rgb[1, 0], [0, 0, 1]) and np.allclose(rgb[0, 0], 0)
    tifffile.imwrite(tmp_path / "w.tif", np.array([[0, 255]], np.uint8), photometric="miniswhite")
    assert np.allclose(read_image(tmp_path / "w.tif", 1)[..., 0], [[1.0, 0.0]])  # 0 is white


# --- float values -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, words", [
    (np.linspace(0, 1000, 64), ["[0, 1000]", "outside [0, 1]"]),
    (np.linspace(-0.5, 0.5, 64), ["[-0.5, 0.5]", "outside [0, 1]"]),
    (np.r_[np.zeros(63), np.nan], ["NaN"]),
])
def test_float_images_are_kept_in_unit_range_and_refused_outside(tmp_path, values, words):
    inside = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    tifffile.imwrite(tmp_path / "ok.tif", inside)
    assert np.array_equal(read_image(tmp_path / "ok.tif", 1)[..., 0], inside)
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, values.astype(np.float32).reshape(8, 8))
    with pytest.raises(UnreadableImage) as e:
        read_image(path, 1)
    for word in words:
        assert word in str(e.value)
    scan = scan_images([path], 1)
    assert not scan.ok[0] and words[0] in scan.unreadable[0]


def test_npz_float_images_outside_unit_range_are_an_error(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, images=np.full((4, 4, 4), 255.0, np.float32), labels=np.arange(4))
    r = load_recipe({"name": "n", "source": {"kind": "npz", "path": str(path)}, "channels": 1, "image_size": 4})
    with pytest.raises(DataError, match=r"x.npz: array 'images': float values span \[255, 255\], outside \[0, 1\]"):
        build_table(r)
