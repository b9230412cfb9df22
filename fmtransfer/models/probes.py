"""Scoring frozen features without a head: a weighted kNN vote (cosine similarity) and a linear probe.

Both return class scores shaped like a head's logits, so the usual metrics, prediction files and confusion
matrices apply to them unchanged.
"""

from __future__ import annotations

import numpy as np

from fmtransfer.errors import ConfigError, DataError


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


def knn_loo_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 20, temperature: float = 0.07) -> float:
    """Leave-one-out kNN accuracy of one labelled set: each sample classified by the votes of the others.

    features: (n, d); labels: (n,) class indices. It needs no second split, so an export can score an embedding
    model on its gate split alone.
    """
    labels = np.asarray(labels, dtype=np.int64)
    scores = knn_scores(features, labels, features, int(labels.max()) + 1, k, temperature, exclude_self=True)
    return float((scores.argmax(1) == labels).mean())


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
