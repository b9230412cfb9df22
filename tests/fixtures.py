"""Test data made by code: small image trees, CSV manifests and .npz files with learnable classes.

Each class is a distinct pattern (a bright bar in a class-specific place) plus noise, so a tiny model can
tell them apart in a few steps, and nothing is downloaded.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def pattern(cls: int, size: int, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """(size, size, channels) uint8 image of class ``cls``."""
    img = rng.integers(0, 60, size=(size, size, channels)).astype(np.float32)
    band = max(2, size // 8)
    pos = (cls * 2 * band) % (size - band)
    if cls % 2:
        img[pos:pos + band, :, :] += 180
    else:
        img[:, pos:pos + band, :] += 180
    return np.clip(img, 0, 255).astype(np.uint8)


def save_image(arr: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, np.moveaxis(arr, -1, 0) if arr.shape[-1] > 4 else arr.squeeze())
    else:
        Image.fromarray(arr.squeeze() if arr.shape[-1] == 1 else arr).save(path)
    return path


def make_image_folder(root: Path, classes=("a", "b", "c"), per_class: int = 12, size: int = 16,
                      channels: int = 1, suffix: str = ".png", regions: tuple[str, ...] | None = None,
                      seed: int = 0) -> Path:
    """root/<class>/<i><suffix>, or root/<region>/<class>/... when ``regions`` is given."""
    rng = np.random.default_rng(seed)
    for region in regions or (None,):
        base = root / region if region else root
        for c, name in enumerate(classes):
            for i in range(per_class):
                save_image(pattern(c, size, rng, channels), base / name / f"{i:03d}{suffix}")
    return root


def make_csv_manifest(root: Path, classes=("a", "b", "c"), per_class: int = 12, size: int = 16,
                      regions=("north", "south"), with_split: bool = False, seed: int = 0) -> Path:
    """root/images/*.png plus root/manifest.csv with path,label,region[,split] (relative paths)."""
    rng = np.random.default_rng(seed)
    rows = []
    for region in regions:
        for c, name in enumerate(classes):
            for i in range(per_class):
                rel = f"images/{region}_{name}_{i:03d}.png"
                save_image(pattern(c, size, rng, 3), root / rel)
                split = ("test", "val", "train", "train", "train")[i % 5]
                rows.append([rel, name, region] + ([split] if with_split else []))
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "region"] + (["split"] if with_split else []))
        w.writerows(rows)
    return path


def make_npz(path: Path, n: int = 60, size: int = 16, channels: int = 4, regression: bool = False,
             seed: int = 0) -> Path:
    """images (n, size, size, channels) uint8 and labels (class ints, or a float target for regression)."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 3, size=n)
    images = np.stack([pattern(int(c), size, rng, channels) for c in classes])
    labels = (images.astype(np.float32).mean(axis=(1, 2, 3)) / 255.0 * 10.0) if regression else classes
    np.savez(path, images=images, labels=labels)
    return path


def corrupt(path: Path) -> Path:
    """Truncate an image file to a few bytes so that it no longer decodes."""
    data = path.read_bytes()
    path.write_bytes(data[: max(8, len(data) // 10)])
    return path
