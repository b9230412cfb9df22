"""Batch inference over a data loader: model outputs or backbone features.

Every stage that runs a model over data (evaluate, adapt's scoring and diverse calibration, curation's embedding)
goes through :func:`predict` or :func:`embed`; Lightning places the model on the device and shows progress.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from fmtransfer.models.classifier import Classifier
from fmtransfer.models.sync_norm import SyncBatchNormAnyDevice

_LIGHTNING_LOG = logging.getLogger("pytorch_lightning.utilities.rank_zero")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hide Lightning's device banner for inference trainers, where it is noise."""
    level = _LIGHTNING_LOG.level
    _LIGHTNING_LOG.setLevel(logging.WARNING)
    try:
        yield
    finally:
        _LIGHTNING_LOG.setLevel(level)


class _Inference(pl.LightningModule):
    """``predict_step`` of a :class:`Classifier`: (outputs, targets, rows) per batch, or features only."""

    def __init__(self, model: Classifier, features: bool):
        super().__init__()
        self.model, self.want_features = model, features

    def predict_step(self, batch, batch_idx):
        if self.want_features:
            return self.model.features(batch[0]).float()
        x, y, rows = batch
        return self.model(x).float(), y, rows


def _run(model: Classifier, loader, features: bool, accelerator: str, device: int | None) -> list[Any]:
    gpu = device is not None and accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    with quiet_lightning():
        trainer = pl.Trainer(accelerator=accelerator, devices=[device] if gpu else 1, logger=False,
                             enable_checkpointing=False, enable_model_summary=False,
                             enable_progress_bar=len(loader) > 5)
        model.eval()
        return trainer.predict(_Inference(model, features), loader)


def predict(model: Classifier, loader, accelerator: str = "auto",
            device: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model outputs over a loader of ``(x, target, row)`` batches, in loader order.

    Args:
        device: which GPU this process uses when there are several (a rank's LOCAL_RANK); ignored on CPU.

    Returns:
        outputs: (n, num_outputs) float32 logits or values; targets: (n,); rows: (n,) table rows.
    """
    batches = _run(model, loader, False, accelerator, device)
    outputs = torch.cat([b[0] for b in batches]).cpu().numpy()
    targets = torch.cat([b[1] for b in batches]).cpu().numpy()
    rows = torch.cat([b[2] for b in batches]).cpu().numpy()
    return outputs, targets, rows


def embed(model: Classifier, loader, accelerator: str = "auto", device: int | None = None) -> np.ndarray:
    """Backbone features over a loader: (n, embed_dim) float32, in loader order. ``device`` as in
    :func:`predict`."""
    return torch.cat(_run(model, loader, True, accelerator, device)).cpu().numpy()


def has_placeholder_norms(model: nn.Module) -> bool:
    """Whether a BatchNorm layer of ``model`` holds the running statistics of one that has seen no data."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and _placeholder(m) for m in model.modules())


def _placeholder(norm: nn.modules.batchnorm._BatchNorm) -> bool:
    if not norm.track_running_stats or norm.running_mean is None:
        return False
    return bool(torch.all(norm.running_mean == 0) and torch.all(norm.running_var == 1))


@torch.no_grad()
def with_measured_norms(model: nn.Module, batches: Iterable, device: Any = "cpu") -> nn.Module:
    """``model`` itself, or, when a BatchNorm layer still holds placeholder statistics (mean 0, variance 1: a
    network that never trained), a copy whose statistics are measured on ``batches`` (``(x, ...)`` tuples).

    Scored with placeholders, a random network's features look better than they are (a random ResNet-18 on
    mnist_global: kNN 0.906, against 0.800 with statistics measured on its images, no weight changed), and a
    baseline that flatters random weights hides what pretraining did. Statistics that came with trained weights
    are kept. The copy has plain BatchNorm (a caller on one rank of several must not wait for the others).
    """
    if not has_placeholder_norms(model):
        return model
    measured = SyncBatchNormAnyDevice().revert(copy.deepcopy(model))
    for m in measured.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over every batch
    was_training = measured.training
    measured.train()
    for batch in batches:
        measured(batch[0].to(device))
    return measured.train(was_training)
