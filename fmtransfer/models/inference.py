"""Batch inference over a data loader: model outputs or backbone features.

Every stage that runs a model over data (evaluate, adapt's scoring and diverse calibration, curation's embedding)
goes through :func:`predict` or :func:`embed`; Lightning places the model on the device and shows progress.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from fmtransfer.models.classifier import Classifier

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
