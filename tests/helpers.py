"""Callbacks that tests plug into real runs through the ``callbacks`` config key."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytorch_lightning as pl


class KillAt(pl.Callback):
    """SIGKILL the process at (epoch, batch): a run dying mid-epoch, with no chance to clean up."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class WaitForFile(pl.Callback):
    """Hold training at its start until ``path`` exists (at most ``timeout_s``): a run kept busy while a test acts."""

    def __init__(self, path: str, timeout_s: float = 300.0):
        self.path, self.timeout_s = path, timeout_s

    def on_train_start(self, trainer, pl_module) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not Path(self.path).exists() and time.monotonic() < deadline:
            time.sleep(0.1)


class StopAfterEpoch(pl.Callback):
    """Stop training after ``epochs`` epochs of a run planned for more (its checkpoint written, its schedules sized
    for the plan): a run that died at an epoch's end, in process."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True
