"""Near-duplicate removal: FAISS kNN on cosine similarity, groups by connected components, one kept per group."""

from __future__ import annotations

import numpy as np

from fmtransfer.curation.kmeans import ASSIGN_BATCH, check_embeddings


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def near_duplicate_groups(x: np.ndarray, threshold: float = 0.95, k: int = 8,
                          batch: int = ASSIGN_BATCH) -> np.ndarray:
    """Group points whose cosine similarity to a neighbour is >= ``threshold`` (transitively).

    Args:
        x: (n, d) embeddings (a memmap is read in batches; the index holds one normalised copy).
        k: neighbours searched per point.
    Returns:
        (n,) int64: each point's group representative (the group's smallest index); ``rep == arange(n)`` keeps one
        per group.
    """
    import faiss
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    check_embeddings(x)
    n, d = x.shape
    index = faiss.IndexFlatIP(d)
    for start in range(0, n, batch):
        index.add(_unit(x[start:start + batch]))
    rows, cols = [], []
    for start in range(0, n, batch):
        sims, nbrs = index.search(_unit(x[start:start + batch]), min(k + 1, n))
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
