"""Near-duplicate removal: exact cosine kNN with FAISS, inside clusters when the pool is large; groups by
connected components, one kept per group."""

from __future__ import annotations

import numpy as np

from fmtransfer.clustering import ASSIGN_BATCH, assign, kmeans
from fmtransfer.curation.kmeans import check_embeddings
from fmtransfer.errors import DataError

EXACT_UP_TO = 50_000
MAX_CELL = 4096  # cells larger than this are split by k-means before the exact search
BLOCK_ENTRIES = 1 << 24  # query rows x candidates per similarity block (64 MiB of float32)


def _unit(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32) - mean
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _mean(x: np.ndarray, batch: int) -> np.ndarray:
    total = np.zeros(x.shape[1], dtype=np.float64)
    for start in range(0, len(x), batch):
        total += np.asarray(x[start:start + batch], dtype=np.float64).sum(0)
    return (total / len(x)).astype(np.float32)


def _close_pairs(u: np.ndarray, threshold: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) local index pairs with j among i's ``k`` most similar rows of ``u`` (unit vectors) and cosine >=
    ``threshold``; exact, in blocks of queries so that no len(u) x len(u) matrix is held."""
    import faiss

    index = faiss.IndexFlatIP(u.shape[1])
    index.add(u)
    step = max(1, BLOCK_ENTRIES // len(u))
    rows, cols = [], []
    for start in range(0, len(u), step):
        sims, nbrs = index.search(u[start:start + step], min(k + 1, len(u)))
        r, c = np.nonzero((sims >= threshold) & (nbrs >= 0))
        rows.append(r + start)
        cols.append(nbrs[r, c])
    return np.concatenate(rows), np.concatenate(cols)


def near_duplicate_groups(x: np.ndarray, threshold: float = 0.95, k: int = 8, center: bool = True,
                          batch: int = ASSIGN_BATCH, partition: np.ndarray | None = None,
                          exact_up_to: int = EXACT_UP_TO, max_cell: int = MAX_CELL) -> np.ndarray:
    """Group points whose cosine similarity to a neighbour is >= ``threshold`` (transitively).

    Up to ``exact_up_to`` points the search is exact over all of them. Beyond, it is exact inside each cell of
    ``partition`` (e.g. the finest k-means level; computed here with about sqrt(n) cells when not given), as in
    SemDeDup (Abbas et al. 2023): near-duplicates lie at the same place and share a cell almost always, and the
    cost falls from n^2 to the sum of squared cell sizes, with one cell's rows in memory at a time. Cells above
    ``max_cell`` points are split by k-means first (resampled clusters are large where the data is dense).

    With ``center`` the similarity is taken after subtracting the mean embedding: pooled ReLU features all
    point into the positive orthant, where raw cosines are high even between unrelated images.

    Args:
        x: (n, d) embeddings (a memmap is read in batches or one cell at a time).
        k: neighbours searched per point.
        partition: (n,) int labels of the cells to search within when n > ``exact_up_to``.
    Returns:
        (n,) int64: each point's group representative (the group's smallest index); ``rep == arange(n)`` keeps one
        per group.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    check_embeddings(x)
    n, d = x.shape
    mean = _mean(x, batch) if center else np.zeros(d, dtype=np.float32)
    if partition is not None and np.shape(partition) != (n,):
        raise DataError(f"dedup partition has shape {np.shape(partition)}, expected one label per embedding ({n},)")
    if n <= exact_up_to:
        rows, cols = _close_pairs(_unit(x, mean), threshold, k)
    else:
        if partition is None:
            partition = assign(x, kmeans(x, int(np.sqrt(n)), niter=10))[0]
        partition = np.asarray(partition)
        order = np.argsort(partition, kind="stable")
        bounds = np.flatnonzero(np.diff(partition[order])) + 1
        rows, cols = [], []
        cells = [m for m in np.split(order, bounds) if len(m) > 1]
        while cells:
            members = cells.pop()
            u = _unit(x[members], mean)
            if len(members) > max_cell:  # e.g. a resampled cluster over a dense region: split it first
                parts = assign(u, kmeans(u, -(-2 * len(members) // max_cell), niter=10, plusplus=False))[0]
                if parts.max() > parts.min():
                    cells += [members[parts == j] for j in np.unique(parts) if (parts == j).sum() > 1]
                    continue
            r, c = _close_pairs(u, threshold, k)
            rows.append(members[r])
            cols.append(members[c])
        rows = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
        cols = np.concatenate(cols) if cols else np.empty(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    rep = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(rep, comp, np.arange(n))
    return rep[comp]
