"""From a recipe to a validated sample table: labels mapped, files checked, splits fixed, content hashed."""

from __future__ import annotations

import csv
import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmtransfer.data.images import default_cache_dir, scan_images
from fmtransfer.data.recipe import SPLITS, Recipe
from fmtransfer.data.sources import SourceTable, read_source
from fmtransfer.errors import DataError


@dataclass
class Skipped:
    id: str
    where: str
    reason: str


@dataclass
class SampleTable:
    """Every usable sample of a recipe.

    Attributes:
        ids: (n,) sample ids.
        targets: (n,) int64 class indices into ``classes``, or float32 regression targets.
        regions: (n,) region names.
        splits: (n,) one of ``SPLITS``.
        classes: class names in head order (None for regression).
        images: (n, H, W, C) float32 in [0, 1] for array sources, else None.
        paths: (n,) image files for file sources, else None.
        fingerprint: sha256 over ids, content, labels, regions and splits.
        skipped: samples left out: unreadable or refused images, symlink loops.
        total: samples the source listed (before skipping).
        unlabelled: why the source has no labels, else None; ``targets`` are then all -1 and ``classes`` None.
    """

    recipe: Recipe
    ids: np.ndarray
    targets: np.ndarray
    regions: np.ndarray
    splits: np.ndarray
    classes: list[str] | None
    images: np.ndarray | None
    paths: list[Path] | None
    fingerprint: str
    skipped: list[Skipped] = field(default_factory=list)
    total: int = 0
    unlabelled: str | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def indices(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise DataError(f"split={split!r} is not known; expected one of {SPLITS}")
        return np.flatnonzero(self.splits == split)


def natural_key(text: str) -> tuple:
    """Sort key that puts "2" before "10" and "class2" before "class10"."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _map_labels(src: SourceTable, recipe: Recipe, classes: list[str] | None) -> tuple[np.ndarray, list[str] | None]:
    if src.unlabelled:
        return np.full(len(src.labels), -1, dtype=np.int64), None
    if recipe.task == "regression":
        targets = np.empty(len(src.labels), dtype=np.float32)
        for i, value in enumerate(src.labels):
            try:
                targets[i] = float(value)
            except (TypeError, ValueError):
                raise DataError(f"{src.where[i]}: label {value!r} is not a number, but data.task='regression' "
                                f"(recipe {recipe.name!r}); the label column must hold numbers") from None
        if not np.isfinite(targets).all():
            bad = int(np.flatnonzero(~np.isfinite(targets))[0])
            raise DataError(f"{src.where[bad]}: label {src.labels[bad]!r} is not a finite number")
        return targets, None
    raw = [str(v) for v in src.labels]
    if recipe.label_map:
        raw = [recipe.label_map.get(v, v) for v in raw]
    classes = list(classes or recipe.classes or sorted(set(raw), key=natural_key))
    index = {c: i for i, c in enumerate(classes)}
    unknown = [i for i, v in enumerate(raw) if v not in index]
    if unknown:
        labels = sorted({raw[i] for i in unknown}, key=natural_key)
        examples = "; ".join(f"{src.where[i]}: {raw[i]!r}" for i in unknown[:3])
        raise DataError(f"recipe {recipe.name!r}: {len(unknown)} sample(s) have labels not in the class list "
                        f"{labels[:10]} (e.g. {examples}); expected one of {classes} "
                        f"(set data.classes, or map them with data.label_map)")
    return np.array([index[v] for v in raw], dtype=np.int64), classes


def stratified_choice(groups: np.ndarray, keys: list[str], n: int, seed: int) -> np.ndarray:
    """Deterministically pick ``n`` rows keeping each group's share (to within one). Returns sorted rows.

    Args:
        groups: (m,) group of each row.
        keys: (m,) row ids; the pick depends on ids and seed, not on listing order.
    """
    order = np.argsort(np.array(keys, dtype=object), kind="stable")
    perm = order[np.random.default_rng(seed).permutation(len(order))]
    _, inv = np.unique(groups[perm], return_inverse=True)
    sizes = np.bincount(inv)
    rank = np.empty(len(perm), dtype=np.float64)
    counters = np.zeros(len(sizes), dtype=np.int64)
    for pos, g in enumerate(inv):
        counters[g] += 1
        rank[pos] = counters[g]
    # taking rows in order of how far through its group each one is keeps every group's share
    return np.sort(perm[np.argsort(rank / sizes[inv], kind="stable")[:n]])


def assign_splits(ids: list[str], strata: np.ndarray, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Split rows into train/val/test, stratified by ``strata``, deterministic in (ids, seed).

    Rows are ordered by id before shuffling, so the listing order of a source does not change the split.

    Args:
        ids: (n,) sample ids.
        strata: (n,) group of each row (class index; all zeros for regression).
        fractions: {"train": f, "val": f, "test": f}, adding up to 1.
        seed: split seed.
    Returns:
        (n,) array of split names.
    """
    out = np.empty(len(ids), dtype=object)
    id_arr = np.array(ids, dtype=object)
    rng = np.random.default_rng(seed)
    for group in sorted(set(strata.tolist())):
        rows = np.flatnonzero(strata == group)
        rows = rows[np.argsort(id_arr[rows], kind="stable")]
        rows = rows[rng.permutation(len(rows))]
        n_test = int(round(len(rows) * fractions["test"]))
        n_val = int(round(len(rows) * fractions["val"]))
        out[rows[:n_test]] = "test"
        out[rows[n_test:n_test + n_val]] = "val"
        out[rows[n_test + n_val:]] = "train"
    return out


def _fingerprint(src_images: np.ndarray | None, shas: list[str] | None, ids, targets, regions, splits) -> str:
    h = hashlib.sha256()
    if src_images is not None:
        h.update(np.ascontiguousarray(src_images).tobytes())
    for i in range(len(ids)):
        content = shas[i] if shas is not None else ""
        h.update(f"{ids[i]}\t{content}\t{targets[i]}\t{regions[i]}\t{splits[i]}\n".encode())
    return h.hexdigest()


def build_table(recipe: Recipe, *, classes: list[str] | None = None, scan_workers: int | None = None,
                cache_dir: Path | None | str = "default") -> SampleTable:
    """Read the recipe's source and return its validated :class:`SampleTable`.

    Args:
        recipe: a validated recipe.
        classes: force this class order (a model's head) instead of the recipe's or the data's.
        scan_workers: threads that decode files during the scan.
        cache_dir: scan cache folder; "default" uses ``$FMTRANSFER_CACHE`` or ~/.cache/fmtransfer.
    Raises:
        DataError: unknown labels, non-numeric regression labels, channel mismatches, or more unreadable
            images than ``recipe.max_skipped_fraction`` allows.
    """
    src = read_source(recipe)
    targets, classes = _map_labels(src, recipe, classes)
    keep = np.arange(len(src.ids))
    labelled_classes = recipe.task == "classification" and not src.unlabelled
    strata = targets if labelled_classes else np.zeros(len(targets), dtype=np.int64)
    if recipe.limit is not None and recipe.limit < len(keep):
        keep = stratified_choice(strata, src.ids, recipe.limit, recipe.split.seed)

    skipped = [Skipped(*entry) for entry in src.skipped]  # symlink loops met while listing
    shas: list[str] | None = None
    if src.paths is not None:
        paths = [src.paths[i] for i in keep]
        scan = scan_images(paths, recipe.channels, max_pixels=recipe.max_pixels, workers=scan_workers,
                           cache_dir=default_cache_dir() if cache_dir == "default" else cache_dir,
                           desc=f"checking {recipe.name} images")
        if scan.mismatched:
            rows = sorted(scan.mismatched)
            examples = "; ".join(f"{paths[i]} {scan.mismatched[i]}" for i in rows[:3])
            raise DataError(f"recipe {recipe.name!r} asks for data.channels={recipe.channels}, but "
                            f"{len(rows)} image(s) cannot be converted (e.g. {examples}); set data.channels "
                            f"to the images' band count")
        skipped += [Skipped(src.ids[keep[i]], str(paths[i]), reason) for i, reason in sorted(scan.unreadable.items())]
        listed = len(keep) + len(src.skipped)
        fraction = len(skipped) / listed
        if skipped:
            names = ", ".join(s.where for s in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
            warnings.warn(f"recipe {recipe.name!r}: skipped {len(skipped)} unreadable image(s) of {listed} "
                          f"({fraction:.2%}): {names} (first: {skipped[0].where}: {skipped[0].reason})",
                          stacklevel=2)
        if fraction > recipe.max_skipped_fraction:
            raise DataError(f"recipe {recipe.name!r}: {len(skipped)} of {listed} images ({fraction:.2%}) are "
                            f"unreadable, more than data.max_skipped_fraction={recipe.max_skipped_fraction:g} "
                            f"(first: {skipped[0].where}: {skipped[0].reason})")
        shas = [scan.sha256[i] for i in range(len(keep)) if scan.ok[i]]
        keep = keep[scan.ok]

    ids = [src.ids[i] for i in keep]
    targets, strata = targets[keep], strata[keep]
    regions = np.array([src.regions[i] for i in keep], dtype=object)
    if src.splits is not None:
        splits = np.array([src.splits[i] for i in keep], dtype=object)
    else:
        s = recipe.split
        splits = assign_splits(ids, strata, {"train": s.train, "val": s.val, "test": s.test}, s.seed)
    if recipe.subset:
        chosen = _subset_rows(recipe, ids, splits)
        keep, targets, regions, splits = keep[chosen], targets[chosen], regions[chosen], splits[chosen]
        ids = [ids[i] for i in chosen]
        if shas is not None:
            shas = [shas[i] for i in chosen]
    images = src.images[keep] if src.images is not None else None
    paths = [src.paths[i] for i in keep] if src.paths is not None else None
    if not ids:
        raise DataError(f"recipe {recipe.name!r}: no usable samples in {src.origin}")
    return SampleTable(recipe=recipe, ids=np.array(ids, dtype=object), targets=targets, regions=regions,
                       splits=splits, classes=classes, images=images, paths=paths,
                       fingerprint=_fingerprint(images, shas, ids, targets, regions, splits),
                       skipped=skipped, total=len(src.ids) if recipe.limit is None else recipe.limit,
                       unlabelled=src.unlabelled)


def read_manifest(path: str | Path, key: str) -> list[dict[str, str]]:
    """The rows of a manifest CSV with an ``id`` column (a curated subset, a calibration list).

    Raises:
        DataError: naming ``key`` (the config key that gave the path) when the file is missing or has no ``id``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{key}={path}: no such manifest")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "id" not in reader.fieldnames:
            raise DataError(f"{key}={path}: a manifest needs an 'id' column; it has {reader.fieldnames}")
        return list(reader)


def _subset_rows(recipe: Recipe, ids: list[str], splits: np.ndarray) -> np.ndarray:
    """Rows kept by ``recipe.subset``: every val/test row, and the train rows the manifest names."""
    path = Path(recipe.subset).expanduser()
    rows = read_manifest(path, "data.subset")
    missing_files = [r["path"] for r in rows if r.get("path") and not Path(r["path"]).exists()]
    if missing_files:
        raise DataError(f"data.subset={path} names {len(missing_files)} file(s) that do not exist, "
                        f"e.g. {missing_files[:3]}")
    wanted = {r["id"] for r in rows}
    unknown = wanted - set(ids)
    if unknown:
        raise DataError(f"data.subset={path}: {len(unknown)} id(s) are not in recipe {recipe.name!r} "
                        f"(or were skipped as unreadable), e.g. {sorted(unknown)[:3]}")
    return np.flatnonzero([split != "train" or i in wanted for i, split in zip(ids, splits, strict=True)])
