"""Datasets over a :class:`SampleTable`, and a sampler whose order depends only on (seed, epoch)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from fmtransfer.data.images import UnreadableImage, read_image
from fmtransfer.data.preprocess import Preprocess
from fmtransfer.data.table import SampleTable
from fmtransfer.errors import DataError


class TableDataset(Dataset):
    """Rows ``rows`` of a table as ``(image, target, row)`` triples.

    Array sources are preprocessed once into one tensor; file sources are decoded per item (in workers).
    ``row`` is the index into the table, so predictions map back to sample ids.
    """

    def __init__(self, table: SampleTable, rows: np.ndarray, preprocess: Preprocess):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.preprocess = preprocess
        self.targets = torch.as_tensor(table.targets[self.rows])
        self.images = preprocess.batch(table.images[self.rows]) if table.images is not None else None
        self.paths = [table.paths[r] for r in self.rows] if table.paths is not None else None
        self.max_pixels = table.recipe.max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        if self.images is not None:
            x = self.images[i]
        else:
            try:
                x = self.preprocess.image(read_image(self.paths[i], self.preprocess.channels,
                                                     max_pixels=self.max_pixels))
            except UnreadableImage as e:  # it passed the scan: the file changed under a running job
                raise DataError(f"{self.paths[i]}: became unreadable during the run ({e})") from e
        return x, self.targets[i], int(self.rows[i])


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``seed + epoch``.

    The order of epoch k is the same whether a run got there uninterrupted or resumed from a checkpoint,
    which is what makes resumed runs end with the same metrics. Lightning calls ``set_epoch``.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())
