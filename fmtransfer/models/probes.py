"""Scoring frozen features without a head: a weighted kNN vote (cosine similarity) and a linear probe.

Both return class scores shaped like a head's logits, so the usual metrics, prediction files and confusion
matrices apply to them unchanged.
"""

from __future__ import annotations

import logging

import numpy as np

from fmtransfer.errors import ConfigError, DataError

log = logging.getLogger(__name__)
# below this many images of a class (the median class) a leave-one-out kNN accuracy is noisy and biased low
LOO_MIN_PER_CLASS = 10


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_scores(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, num_classes: int, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024, exclude_self: bool = False) -> np.ndarray:
    """Class scores of a weighted kNN vote over cosine similarity (Wu et al. 2018, as DINO evaluates).

    Each of the ``k`` nearest bank samples votes for its class with weight exp(similarity / temperature).

    Args:
        bank: (m, d) features of labelled samples (e.g. the train split).
        bank_labels: (m,) their class indices.
        queries: (n, d) features to classify.
        num_classes: number of classes.
        exclude_self: ``queries`` are the bank itself (row i is bank sample i), and no sample votes for itself:
            a leave-one-out score of one labelled set.
    Returns:
        (n, num_classes) float32 vote totals; the argmax is the prediction.
    """
    if k < 1 or temperature <= 0:
        raise ConfigError(f"kNN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if len(bank) == 0:
        raise DataError("kNN: the bank of labelled samples is empty")
    bank_u, labels = _unit(bank), np.asarray(bank_labels, dtype=np.int64)
    if exclude_self and len(queries) != len(bank_u):
        raise DataError(f"kNN leave-one-out: {len(queries)} queries but a bank of {len(bank_u)}; they must be one set")
    k = min(k, len(bank_u) - int(exclude_self))
    if k < 1:
        raise DataError("kNN leave-one-out needs at least two labelled samples")
    out = np.zeros((len(queries), num_classes), dtype=np.float32)
    for start in range(0, len(queries), chunk):
        sim = _unit(queries[start:start + chunk]) @ bank_u.T  # (c, m)
        if exclude_self:
            sim[np.arange(len(sim)), np.arange(start, start + len(sim))] = -np.inf
        nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sim, nearest, axis=1) / temperature)
        rows = np.repeat(np.arange(len(nearest)), k)
        np.add.at(out[start:start + chunk], (rows, labels[nearest].ravel()), weights.ravel())
    return out


def knn_loo_k(labels: np.ndarray, k: int) -> int:
    """The k a leave-one-out vote over ``labels`` uses: ``k``, capped at half of what the median class holds besides
    the left-out image (at least 1).

    With k near a class's size the vote becomes a count of the classes among the neighbours, and the left-out
    image's own class always has one image fewer than the others: embeddings that tell nothing apart then score 0
    instead of chance (40 images of 10 classes, k=20). A class of one image is left out of the median: it is never
    scored (:func:`knn_loo_accuracy`).
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    counts = counts[counts >= 2]
    if not len(counts):
        return 1
    return max(1, min(int(k), (int(np.median(counts)) - 1) // 2))


def knn_loo_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 20, temperature: float = 0.07) -> float:
    """Leave-one-out kNN accuracy of one labelled set: each sample classified by the votes of the others.

    features: (n, d); labels: (n,) class indices. It needs no second split, so an export can score an embedding
    model on its gate split alone. ``k`` is capped by :func:`knn_loo_k`; an image that is alone in its class has
    no neighbour of its own to find, so it votes but is not scored.

    Raises:
        DataError: no class holds two images (nothing can be scored). Fewer than ``LOO_MIN_PER_CLASS`` images in
            the median class is a warning: the score is then noisy and biased low (chance is (c-1)/(n-1) for
            classes of c among n images, below 1/classes).
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    scored = counts[labels] >= 2
    n_classes = int((counts > 0).sum())
    if not scored.any():
        raise DataError(f"kNN leave-one-out: the split is too small to score: {len(labels)} images of {n_classes} "
                        f"classes, none with a second image; it needs at least 2 images of a class (better "
                        f"{LOO_MIN_PER_CLASS} or more): use a larger split or recipe")
    k_used = knn_loo_k(labels, k)
    typical = int(np.median(counts[counts >= 2]))
    if typical < LOO_MIN_PER_CLASS:
        log.warning(f"kNN leave-one-out on {len(labels)} images of {n_classes} classes, about {typical} images per "
                    f"class (k={k_used}): fewer than {LOO_MIN_PER_CLASS} a class makes the score noisy and biased "
                    f"low (chance about {(typical - 1) / max(1, len(labels) - 1):.3f}); use a larger split")
    scores = knn_scores(features, labels, features, int(labels.max()) + 1, k_used, temperature, exclude_self=True)
    return float((scores.argmax(1) == labels)[scored].mean())


def linear_probe_scores(train: np.ndarray, train_labels: np.ndarray, queries: np.ndarray, num_classes: int,
                        c: float = 1.0, max_iter: int = 1000, seed: int = 0) -> np.ndarray:
    """Class scores of a multinomial logistic regression fitted on frozen, standardised features.

    Args:
        train: (m, d) features of labelled samples; train_labels: (m,) class indices.
        queries: (n, d) features to classify.
        c: inverse L2 regularisation strength (scikit-learn's ``C``).
    Returns:
        (n, num_classes) float32 log-probabilities (classes absent from ``train`` get -inf).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(train_labels, dtype=np.int64)
    present = np.unique(labels)
    if len(present) < 2:
        raise DataError(f"linear probe: the training samples hold {len(present)} class(es); it needs two or more")
    scaler = StandardScaler().fit(train)
    probe = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    probe.fit(scaler.transform(train), labels)
    out = np.full((len(queries), num_classes), -np.inf, dtype=np.float32)
    out[:, probe.classes_] = probe.predict_log_proba(scaler.transform(queries))
    return out
