"""Accuracy on real data (MNIST 5k as the global set, UCI digits as a new region): no synthetic stand-ins."""

from __future__ import annotations

import pytest

from fmtransfer.tasks.pipeline import pipeline
from fmtransfer.tasks.pretrain import pretrain


def test_tiny_cnn_learns_real_digits(cfg_factory):
    """A 0.4M-parameter CNN, 3 short epochs on 1,500 real MNIST digits: far above chance (0.1)."""
    result = pretrain(cfg_factory("pretrain", "backbone=tiny_cnn", "data.limit=1500", "trainer.max_epochs=3",
                                  "loader.batch_size=64", "logger=none"))
    assert result["metrics"]["test"]["overall"]["accuracy"] >= 0.8


@pytest.mark.slow
def test_demo_meets_its_targets(cfg_factory):
    """The demo's claims: global test accuracy >= 0.95, and a real drop zero-shot on the new region."""
    result = pipeline(cfg_factory("pipeline", "experiment=demo"))
    global_acc = result["steps"]["pretrain"]["metrics"]["test"]["overall"]["accuracy"]
    region_acc = result["steps"]["zero_shot"]["metrics"]["overall"]["accuracy"]
    assert global_acc >= 0.95
    assert region_acc < global_acc - 0.1
