"""The leave-one-out kNN accuracy that gates an embedding model's export, on gate splits of a few images a class."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fmtransfer.errors import DataError
from fmtransfer.models.probes import knn_loo_accuracy, knn_loo_k

LABELS_40 = np.repeat(np.arange(10), 4)  # 40 images of 10 classes, as a small gate split


def test_a_model_that_tells_nothing_apart_scores_near_chance_not_zero():
    """Every embedding alike (a random CNN's pooled features nearly are): the vote is then a count of the classes
    among the k nearest, and with k=20 over 39 others the left-out image's class, one short, never won (0.0)."""
    same = np.ones((40, 8), dtype=np.float32)
    assert knn_loo_accuracy(same, LABELS_40, k=20) > 0
    rng = np.random.default_rng(0)
    accs = [knn_loo_accuracy(rng.normal(size=(40, 16)) + 3, LABELS_40, k=20) for _ in range(50)]
    # leave-one-out leaves 3 of the image's class among 39: chance is 3/39, not 1/10
    assert 0.05 < float(np.mean(accs)) < 0.11


def test_k_is_capped_by_the_images_a_class_has():
    assert knn_loo_k(LABELS_40, 20) == 1
    assert knn_loo_k(np.repeat(np.arange(10), 11), 20) == 5
    assert knn_loo_k(np.repeat(np.arange(3), 500), 20) == 20


def test_separable_classes_still_score_one_and_a_lone_image_is_not_scored():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 8)) * 5
    labels = np.array([0] * 12 + [1] * 12 + [2] * 12 + [3])  # class 3: one image, no neighbour of its own to find
    feats = centres[labels] + rng.normal(size=(len(labels), 8)) * 0.1
    assert knn_loo_accuracy(feats, labels, k=20) == 1.0


def test_a_split_too_small_to_score_is_refused_and_a_small_one_warned(caplog):
    with pytest.raises(DataError, match=r"too small to score: 10 images of 10 classes.*at least 2 images"):
        knn_loo_accuracy(np.eye(10), np.arange(10))
    with caplog.at_level(logging.WARNING, logger="fmtransfer.models.probes"):
        knn_loo_accuracy(np.random.default_rng(0).normal(size=(40, 8)), LABELS_40)
    assert "4 images per class" in caplog.text and "k=1" in caplog.text
