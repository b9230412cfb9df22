"""Near-duplicate removal: FAISS kNN on cosine similarity, groups by connected components, one kept per group."""

from __future__ import annotations

import numpy as np

from fmtransfer.curation.kmeans import ASSIGN_BATCH, check_embeddings


def _unit(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32) - mean
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _mean(x: np.ndarray, batch: int) -> np.ndarray:
    total = np.zeros(x.shape[1], dtype=np.float64)
    for start in range(0, len(x), batch):
        total += np.asarray(x[start:start + batch], dtype=np.float64).sum(0)
    return (total / len(x)).astype(np.float32)


EXACT_UP_TO = 50_000


def _index(x: np.ndarray, mean: np.ndarray, batch: int):
    """Exact inner-product search up to EXACT_UP_TO points; beyond, an IVF index with fp16 codes (half the
    memory of the embeddings, about 4 sqrt(n) lists, 16 probed): near-duplicates share a list almost always."""
    import faiss

    n, d = x.shape
    if n <= EXACT_UP_TO:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))
        index.train(_unit(x[sample], mean))
        index.nprobe = 16
    for start in range(0, n, batch):
        index.add(_unit(x[start:start + batch], mean))
    return index


def near_duplicate_groups(x: np.ndarray, threshold: float = 0.95, k: int = 8, center: bool = True,
                          batch: int = ASSIGN_BATCH) -> np.ndarray:
    """Group points whose cosine similarity to a neighbour is >= ``threshold`` (transitively).

    With ``center`` the similarity is taken after subtracting the mean embedding: pooled ReLU features all
    point into the positive orthant, where raw cosines are high even between unrelated images.

    Args:
        x: (n, d) embeddings (a memmap is read in batches; the index holds one normalised copy, fp16 when large).
        k: neighbours searched per point.
    Returns:
        (n,) int64: each point's group representative (the group's smallest index); ``rep == arange(n)`` keeps one
        per group.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    check_embeddings(x)
    n, d = x.shape
    mean = _mean(x, batch) if center else np.zeros(d, dtype=np.float32)
    index = _index(x, mean, batch)
    rows, cols = [], []
    for start in range(0, n, batch):
        sims, nbrs = index.search(_unit(x[start:start + batch], mean), min(k + 1, n))
        hit = (sims >= threshold) & (nbrs >= 0)
        r, c = np.nonzero(hit)
        rows.append(r + start)
        cols.append(nbrs[r, c])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    rep = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(rep, comp, np.arange(n))
    return rep[comp]
