"""The supervised LightningModule (classification or regression) and its checkpoint helpers."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MetricCollection, R2Score
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from fmtransfer.models.classifier import Classifier
from fmtransfer.models.schedules import lightning_optimizers

STAGES = ("train", "val", "test")


def _metrics(task: str, num_outputs: int) -> MetricCollection:
    if task == "classification":
        return MetricCollection({"acc": MulticlassAccuracy(num_outputs, average="micro"),
                                 "macro_f1": MulticlassF1Score(num_outputs, average="macro")})
    return MetricCollection({"r2": R2Score(), "mae": MeanAbsoluteError()})


class SupervisedModule(pl.LightningModule):
    """Trains a :class:`Classifier` on labelled batches ``(x, y, row)``.

    Args:
        model: backbone + head.
        task: "classification" (``loss`` on logits and class indices) or "regression" (on one output).
        loss: the loss module (from config ``_target_``: CrossEntropyLoss, MSELoss, HuberLoss, ...).
        optimizer: ``params -> Optimizer`` (a config partial).
        scheduler: ``(optimizer, total_steps) -> LRScheduler`` (a config partial), stepped every step.
        meta: the model's header (architecture, classes, preprocessing), stored in every checkpoint so a
            checkpoint alone can be evaluated.
        augment: a batch transform applied to training batches only (e.g. ``RandomAffine``).
        seed: seeds the augmentation generator, reseeded with ``seed + epoch`` at every epoch start.
        frozen_norm_stats: keep BatchNorm layers in eval mode while training (their running statistics stay
            those of the global data), as a linear probe expects.
    """

    def __init__(self, model: Classifier, task: str, loss: nn.Module, optimizer: Callable,
                 scheduler: Callable | None = None, meta: dict[str, Any] | None = None,
                 augment: nn.Module | None = None, seed: int = 0, frozen_norm_stats: bool = False):
        super().__init__()
        self.frozen_norm_stats = frozen_norm_stats
        self.model, self.task, self.loss_fn, self.augment = model, task, loss, augment
        self.seed = seed
        self._augment_generator = torch.Generator()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.meta = meta or {}
        # ModuleDict keys cannot be "train" (nn.Module.train), hence the suffix
        self.metrics = nn.ModuleDict({f"{s}_metrics": _metrics(task, model.head.out_features) for s in STAGES})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.frozen_norm_stats:  # Lightning calls train() at every epoch: re-freeze each time
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def on_train_epoch_start(self) -> None:
        # its own generator: how many numbers the data loader draws elsewhere cannot shift the augmentation
        self._augment_generator.manual_seed(self.seed + self.current_epoch)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.augment is not None and self.trainer is not None and self.trainer.training:
            x, y, rows = batch
            batch = (self.augment(x, generator=self._augment_generator), y, rows)
        return batch

    def model_step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step shared by train/val/test: (loss, outputs, targets)."""
        x, y, _ = batch
        out = self.model(x)
        if self.task == "regression":
            out, y = out.squeeze(-1), y.float()
        return self.loss_fn(out, y), out, y

    def _step(self, batch, stage: str) -> torch.Tensor:
        loss, out, y = self.model_step(batch)
        self.metrics[f"{stage}_metrics"].update(out.detach(), y)
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True,
                 batch_size=len(y))
        return loss

    def _epoch_end(self, stage: str) -> None:
        values = self.metrics[f"{stage}_metrics"].compute()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")
        self.metrics[f"{stage}_metrics"].reset()

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_train_epoch_end(self) -> None:
        self._epoch_end("train")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def configure_optimizers(self):
        return lightning_optimizers(self.model.parameters(), self.optimizer_factory, self.scheduler_factory,
                                    self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fmtransfer"] = self.meta


class EpochSeed(pl.Callback):
    """Reseeds torch, NumPy and ``random`` with ``seed + epoch`` before the first batch of every epoch.

    Epoch k then draws the same random numbers (dropout, stochastic depth) whether the run got there in one
    go or resumed from a checkpoint, so resumed runs end with the same metrics. It runs at the first batch,
    after the data loader has drawn its own seed, which happens at different moments in the two cases.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx != 0:
            return
        s = self.seed + trainer.current_epoch
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)
