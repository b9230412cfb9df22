"""One LightningDataModule for every recipe."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from fmtransfer.data.dataset import EpochSampler, TableDataset
from fmtransfer.data.images import ChannelMismatch, convert_channels
from fmtransfer.data.preprocess import Preprocess
from fmtransfer.data.recipe import SPLITS, Recipe
from fmtransfer.data.table import SampleTable, build_table
from fmtransfer.errors import ConfigError, DataError
from fmtransfer.lineage.io import write_text_atomic


def resolve_workers(num_workers: int | str, file_backed: bool) -> int:
    """``auto``: in-memory arrays need no workers; files get up to 4 decoding processes."""
    if num_workers == "auto":
        return min(4, max(0, (os.cpu_count() or 1) - 1)) if file_backed else 0
    try:
        value = int(num_workers)
    except (TypeError, ValueError):
        raise ConfigError(f"loader.num_workers={num_workers!r}; expected 'auto' or an integer >= 0") from None
    if value < 0:
        raise ConfigError(f"loader.num_workers={value}; expected 'auto' or an integer >= 0")
    return value


class RecipeDataModule(pl.LightningDataModule):
    """Reads a recipe once, then serves any split.

    Args:
        recipe: the validated data recipe.
        batch_size: samples per batch.
        num_workers: DataLoader workers, or "auto".
        preprocess: the model's preprocessing (default: the recipe's size, channels and normalisation).
        classes: map labels onto this class order (a trained head's), instead of the recipe's.
        seed: seed of the training order (epoch k is shuffled with ``seed + k``).
        output_dir: where the split manifest and the skipped-image list are written.
        require_labels: refuse a source without labels (an image folder without class folders, a CSV without a
            label column) when the data is read; only self-supervised pretraining reads such sources.
    """

    def __init__(self, recipe: Recipe, *, batch_size: int = 64, num_workers: int | str = "auto",
                 preprocess: Preprocess | None = None, classes: list[str] | None = None, seed: int = 0,
                 output_dir: str | Path | None = None, require_labels: bool = True):
        super().__init__()
        if int(batch_size) < 1:
            raise ConfigError(f"loader.batch_size={batch_size} must be >= 1")
        self.recipe = recipe
        self.batch_size = int(batch_size)
        self.num_workers_setting = num_workers
        self.preprocess = preprocess or Preprocess.from_recipe(recipe)
        self.forced_classes = classes
        self.seed = seed
        self.output_dir = Path(output_dir) if output_dir else None
        self.require_labels = require_labels
        self.table: SampleTable | None = None
        self.files: dict[str, Path] = {}
        self._datasets: dict[str, TableDataset] = {}
        self._rows: dict[str, np.ndarray] = {}

    # --- reading ---------------------------------------------------------------------------------
    def prepare(self) -> SampleTable:
        """Read, validate and split the data (idempotent). Raises DataError before any training."""
        if self.table is None:
            table = build_table(self.recipe, classes=self.forced_classes)
            if table.unlabelled and self.require_labels:
                raise DataError(f"data recipe {self.recipe.name!r} has no labels: {table.unlabelled}. This needs "
                                f"labels: put the images in class folders or add a label column; self-supervised "
                                f"pretraining (fmtransfer pretrain method=dino) reads unlabelled data")
            self.table = table
            if self.output_dir is not None:
                self.files = self.write_manifests(self.output_dir / "data")
        return self.table

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    @property
    def classes(self) -> list[str] | None:
        return self.prepare().classes

    @property
    def num_outputs(self) -> int:
        """Head width: the class count, or 1 for regression."""
        return len(self.classes) if self.recipe.task == "classification" else 1

    def split_size(self, split: str) -> int:
        return len(self.prepare().indices(split))

    # --- serving -----------------------------------------------------------------------------------
    def use_rows(self, split: str, rows: np.ndarray) -> None:
        """Serve only these table rows for ``split`` (a calibration subset of the train split, say)."""
        table = self.prepare()
        rows = np.asarray(rows, dtype=np.int64)
        outside = np.setdiff1d(rows, table.indices(split))
        if len(outside):
            raise DataError(f"rows {outside[:5].tolist()} are not in split {split!r}")
        self._rows[split] = rows
        self._datasets.pop(split, None)

    def rows(self, split: str) -> np.ndarray:
        return self._rows[split] if split in self._rows else self.prepare().indices(split)

    def dataset(self, split: str) -> TableDataset:
        if split not in self._datasets:
            table = self.prepare()
            rows = self.rows(split)
            if len(rows) == 0:
                raise DataError(f"recipe {self.recipe.name!r} has no samples in split {split!r} "
                                f"(sizes: {self.split_sizes()}); adjust data.split")
            self._datasets[split] = TableDataset(table, rows, self.preprocess)
        return self._datasets[split]

    def split_sizes(self) -> dict[str, int]:
        table = self.prepare()
        return {s: int((table.splits == s).sum()) for s in SPLITS}

    def dataloader(self, split: str, shuffle: bool = False) -> DataLoader:
        ds = self.dataset(split)
        workers = resolve_workers(self.num_workers_setting, ds.paths is not None)
        drop_last = shuffle and len(ds) > self.batch_size  # a last batch of 1 breaks BatchNorm
        return DataLoader(ds, batch_size=self.batch_size, sampler=EpochSampler(len(ds), shuffle, self.seed),
                          num_workers=workers, persistent_workers=workers > 0, drop_last=drop_last)

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    # --- manifests -----------------------------------------------------------------------------------
    def write_manifests(self, folder: Path) -> dict[str, Path]:
        """Write ``<recipe>.splits.csv`` (id,label,region,split) and, if any, ``<recipe>.skipped.csv``."""
        table = self.prepare()
        name = self.recipe.name
        out = {"splits": folder / f"{name}.splits.csv"}
        if table.unlabelled:
            labels = [""] * len(table)
        elif table.classes is not None:
            labels = [table.classes[t] for t in table.targets]
        else:
            labels = [f"{t:.6g}" for t in table.targets]
        write_text_atomic(out["splits"], _csv(["id", "label", "region", "split"],
                                              zip(table.ids, labels, table.regions, table.splits)))
        if table.skipped:
            out["skipped"] = folder / f"{name}.skipped.csv"
            write_text_atomic(out["skipped"], _csv(["id", "path", "reason"],
                                                   ((s.id, s.where, s.reason) for s in table.skipped)))
        return out

    def summary(self) -> dict:
        table = self.prepare()
        return {"recipe": self.recipe.name, "samples": len(table), "listed": table.total,
                "skipped": len(table.skipped), "splits": self.split_sizes(),
                "classes": table.classes, "labelled": not table.unlabelled,
                "regions": sorted(set(table.regions.tolist())),
                "fingerprint": table.fingerprint}


def check_fit(recipe: Recipe, meta: Mapping[str, Any]) -> None:
    """A recipe can feed a model when the tasks agree and the images convert to the model's channels.

    A model without a head (``num_outputs`` 0: a self-supervised backbone) reads any task's recipe.

    Args:
        meta: the model's header (``task``, ``num_outputs``, ``preprocess.channels``).
    """
    if int(meta["num_outputs"]) > 0 and recipe.task != meta["task"]:
        raise ConfigError(f"data recipe {recipe.name!r} is a {recipe.task} task but the model is {meta['task']}")
    want = int(meta["preprocess"]["channels"])
    try:
        convert_channels(np.zeros((1, 1, recipe.channels), dtype=np.float32), want)
    except ChannelMismatch:
        raise ConfigError(f"data recipe {recipe.name!r} has data.channels={recipe.channels}, but the model takes "
                          f"{want}-channel images and they cannot be converted") from None


def build_datamodule(recipe: Recipe, loader: Mapping[str, Any], *, model_meta: Mapping[str, Any] | None = None,
                     model_classes: bool = False, seed: int = 0, output_dir: str | Path | None = None,
                     require_labels: bool = True) -> RecipeDataModule:
    """The datamodule a stage reads ``recipe`` through.

    Args:
        loader: the ``loader`` config group: ``batch_size`` and ``num_workers``.
        model_meta: the header of the model that will read the data: the recipe is checked against it
            (:func:`check_fit`) and its preprocessing is used (default: the recipe's own).
        model_classes: map labels onto the model's class order (to score its head) instead of the recipe's.
        seed, output_dir, require_labels: as for :class:`RecipeDataModule`.
    """
    preprocess = classes = None
    if model_meta is not None:
        check_fit(recipe, model_meta)
        preprocess = Preprocess.from_dict(model_meta["preprocess"])
        classes = model_meta["classes"] if model_classes else None
    return RecipeDataModule(recipe, batch_size=loader["batch_size"], num_workers=loader["num_workers"],
                            preprocess=preprocess, classes=classes, seed=seed, output_dir=output_dir,
                            require_labels=require_labels)


def _csv(header: list[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def rows_by_region(table: SampleTable, rows: np.ndarray) -> dict[str, np.ndarray]:
    """{region: positions into ``rows``} for per-region metrics."""
    regions = table.regions[rows]
    return {r: np.flatnonzero(regions == r) for r in sorted(set(regions.tolist()))}
