"""Near-duplicate removal: exact cosine kNN with FAISS, inside clusters when the pool is large; a point is dropped
only when it is within the threshold of a point that is kept (greedily, in pool order), never by a chain."""

from __future__ import annotations

import numpy as np

from fmtransfer.clustering import ASSIGN_BATCH, assign, kmeans
from fmtransfer.curation.kmeans import check_embeddings
from fmtransfer.errors import ConfigError, DataError

EXACT_UP_TO = 50_000
MAX_CELL = 4096  # cells larger than this are split by k-means before the exact search
BLOCK_ENTRIES = 1 << 24  # query rows x candidates per similarity block (64 MiB of float32)
# float32 cosines of exact copies come out up to a few 1e-8 below 1: a threshold of 1 (exact copies only) must
# still take them
SIM_SLACK = 1e-6


def _unit(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32) - mean
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _mean(x: np.ndarray, batch: int) -> np.ndarray:
    total = np.zeros(x.shape[1], dtype=np.float64)
    for start in range(0, len(x), batch):
        total += np.asarray(x[start:start + batch], dtype=np.float64).sum(0)
    return (total / len(x)).astype(np.float32)


def _close_pairs(u: np.ndarray, threshold: float, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, similarity) local index triples with j != i among i's ``k`` most similar rows of ``u`` (unit
    vectors) and cosine >= ``threshold``; exact, in blocks of queries so that no len(u) x len(u) matrix is held.
    Also each row's similarity to its farthest searched neighbour (its k-th; -2 when it has none), the scale of
    the ratio test, kept per row so that no pair below ``threshold`` has to be held for it."""
    import faiss

    index = faiss.IndexFlatIP(u.shape[1])
    index.add(u)
    step = max(1, BLOCK_ENTRIES // len(u))
    rows, cols, sims = [], [], []
    kth = np.full(len(u), -2.0, dtype=np.float32)
    for start in range(0, len(u), step):
        sim, nbrs = index.search(u[start:start + step], min(k + 1, len(u)))
        other = (nbrs >= 0) & (nbrs != np.arange(start, start + len(sim))[:, None])
        farthest = np.where(other, sim, np.inf).min(1)
        kth[start:start + len(sim)] = np.where(np.isfinite(farthest), farthest, -2.0)
        r, c = np.nonzero((sim >= threshold - SIM_SLACK) & other)
        rows.append(r + start)
        cols.append(nbrs[r, c])
        sims.append(sim[r, c])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims), kth


def near_duplicates(x: np.ndarray, *, threshold: float | None = 0.99, quantile: float | None = None, k: int = 8,
                    relative: float | None = None, center: bool = True, batch: int = ASSIGN_BATCH,
                    partition: np.ndarray | None = None, exact_up_to: int = EXACT_UP_TO, max_cell: int = MAX_CELL,
                    checked: bool = False, stats: dict | None = None) -> tuple[np.ndarray, float]:
    """Each point's representative and the threshold used: itself when it is kept, else a kept point within the
    threshold of it.

    Points are visited in pool order; one is dropped when one of its ``k`` nearest neighbours with cosine
    similarity >= the threshold was kept, and kept otherwise (as SemDeDup keeps one point per epsilon-ball). So
    every dropped point is a near-duplicate of a kept one itself: a chain of points each close to the next, whose
    ends are far apart, keeps a point every threshold's width along it (grouping by connected components kept one
    per chain, and on a class whose embeddings crowd together it dropped most of the class).

    Up to ``exact_up_to`` points the search is exact over all of them. Beyond, it is exact inside each cell of
    ``partition`` (e.g. the finest k-means level; computed here with about sqrt(n) cells when not given), as in
    SemDeDup (Abbas et al. 2023): near-duplicates lie at the same place and share a cell almost always, and the
    cost falls from n^2 to the sum of squared cell sizes, with one cell's rows in memory at a time. Cells above
    ``max_cell`` points are split by k-means first (resampled clusters are large where the data is dense).

    With ``center`` the similarity is taken after subtracting the mean embedding: pooled ReLU features all
    point into the positive orthant, where raw cosines are high even between unrelated images.

    Args:
        x: (n, d) embeddings (a memmap is read in batches or one cell at a time).
        threshold: cosine similarity in (0, 1] at and above which two points are near-duplicates.
        quantile: instead of ``threshold``, the pool's own: the similarity above which this share (in (0, 1)) of
            the points' nearest-neighbour similarities lie, read from the same search (0.01: the closest 1%).
        k: neighbours searched per point.
        relative: when set (e.g. 0.05), a pair must also be this much closer than its own neighbourhood: within
            ``relative`` of the distance ``1 - s_k`` from the denser of its two points to that point's k-th nearest
            neighbour (a ratio test). An embedding that crowds a whole class together (a supervised model's, on a
            class whose images look alike) puts most of that class within 0.99 of a neighbour: those are alike,
            not copies, and the absolute threshold alone took up to two thirds of such a class on Fashion-MNIST.
            Copies stand out from their neighbourhood; the k-th neighbour, not the first, sets the scale so that an
            image with a few (fewer than k) copies reads it from the non-copies around it.
        partition: (n,) int labels of the cells to search within when n > ``exact_up_to``.
        checked: the caller ran :func:`check_embeddings` (a large memmap is not read again for it).
        stats: a dict that, with ``relative``, receives ``scale`` (the median k-th neighbour similarity),
            ``base_threshold`` (the fixed or quantile one), ``raised_pairs`` (pairs above it that the ratio test
            spared) and ``removed_at_threshold`` (how many that threshold alone would have dropped), for the report.
    Returns:
        (n,) int64 representatives (``rep == arange(n)`` marks the kept points), and the threshold used (the fixed
        or quantile one; with ``relative`` a pair needs more where its neighbourhood is dense).
    """
    if not checked:
        check_embeddings(x)
    if quantile is not None:
        if not 0 < quantile < 1:
            raise ConfigError(f"curation.dedup_quantile={quantile}: a share of the pool's nearest-neighbour "
                              f"similarities; expected a value in (0, 1), e.g. 0.01")
    elif threshold is None or not 0 < threshold <= 1:
        raise ConfigError(f"curation.dedup_threshold={threshold}: a cosine similarity in (0, 1] at which two "
                          f"embeddings count as near-duplicates (1: exact copies only)")
    if relative is not None and not 0 < relative < 1:
        raise ConfigError(f"curation.dedup_relative={relative}: a fraction of the pool's typical distance to a "
                          f"neighbour; expected a value in (0, 1), e.g. 0.05, or null")
    n, d = x.shape
    mean = _mean(x, batch) if center else np.zeros(d, dtype=np.float32)
    if partition is not None and np.shape(partition) != (n,):
        raise DataError(f"dedup partition has shape {np.shape(partition)}, expected one label per embedding ({n},)")
    floor = -2.0 if quantile is not None else threshold  # with a quantile: every neighbour, the threshold after
    if n <= exact_up_to:
        rows, cols, sims, kth = _close_pairs(_unit(x, mean), floor, k)
    else:
        rows, cols, sims, kth = _pairs_in_cells(x, mean, floor, k, partition, max_cell)
    if quantile is not None:
        nearest = np.full(n, -np.inf, dtype=np.float32)
        np.maximum.at(nearest, rows, sims)
        searched = nearest[np.isfinite(nearest)]  # a point alone in its cell has no neighbour to measure
        threshold = float(np.quantile(searched, 1 - quantile)) if len(searched) else 1.0
    base = float(threshold)
    limit = np.full(len(sims), base, dtype=np.float32)
    if relative is not None:
        local = np.maximum(kth[rows], kth[cols])  # the denser end of the pair sets its scale
        limit = np.maximum(limit, 1.0 - relative * (1.0 - local)).astype(np.float32)
        if stats is not None:
            at = sims >= base - SIM_SLACK
            found = kth[kth > -2]
            stats.update(scale=float(np.median(found)) if len(found) else 1.0, base_threshold=base,
                         raised_pairs=int(((limit > base) & at).sum()),
                         removed_at_threshold=int((_greedy_keep(n, rows[at], cols[at], sims[at])
                                                   != np.arange(n)).sum()))
    close = sims >= limit - SIM_SLACK
    rows, cols, sims = rows[close], cols[close], sims[close]
    return _greedy_keep(n, rows, cols, sims), base


def near_duplicate_groups(x: np.ndarray, threshold: float = 0.99, k: int = 8, center: bool = True,
                          batch: int = ASSIGN_BATCH, partition: np.ndarray | None = None,
                          exact_up_to: int = EXACT_UP_TO, max_cell: int = MAX_CELL) -> np.ndarray:
    """The representatives of :func:`near_duplicates` at a fixed ``threshold``."""
    return near_duplicates(x, threshold=threshold, k=k, center=center, batch=batch, partition=partition,
                           exact_up_to=exact_up_to, max_cell=max_cell)[0]


def _pairs_in_cells(x: np.ndarray, mean: np.ndarray, threshold: float, k: int, partition: np.ndarray | None,
                    max_cell: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The close pairs and k-th similarities of :func:`_close_pairs`, searched inside each cell of ``partition``
    (global indices; a point alone in its cell has no neighbour: -2)."""
    n = len(x)
    if partition is None:
        partition = assign(x, kmeans(x, int(np.sqrt(n)), niter=10))[0]
    partition = np.asarray(partition)
    order = np.argsort(partition, kind="stable")
    bounds = np.flatnonzero(np.diff(partition[order])) + 1
    rows, cols, sims = [], [], []
    kth = np.full(n, -2.0, dtype=np.float32)
    cells = [m for m in np.split(order, bounds) if len(m) > 1]
    while cells:
        members = cells.pop()
        u = _unit(x[members], mean)
        if len(members) > max_cell:  # e.g. a resampled cluster over a dense region: split it first
            parts = assign(u, kmeans(u, -(-2 * len(members) // max_cell), niter=10, plusplus=False))[0]
            if parts.max() > parts.min():
                cells += [members[parts == j] for j in np.unique(parts) if (parts == j).sum() > 1]
                continue
        r, c, sim, kth[members] = _close_pairs(u, threshold, k)
        rows.append(members[r])
        cols.append(members[c])
        sims.append(sim)
    if not rows:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32), kth
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims), kth


def _greedy_keep(n: int, rows: np.ndarray, cols: np.ndarray, sims: np.ndarray) -> np.ndarray:
    """Visit points in order; a point with a kept earlier neighbour among the close pairs (either direction of the
    kNN relation) is dropped, its representative the most similar kept one."""
    i, j = np.concatenate([rows, cols]), np.concatenate([cols, rows])
    sim = np.concatenate([sims, sims]).astype(np.float32)
    earlier = j < i
    i, j, sim = i[earlier], j[earlier], sim[earlier]
    order = np.lexsort((-sim, i))  # by point, the most similar neighbour first
    i, j = i[order], j[order]
    starts = np.searchsorted(i, np.arange(n + 1))
    rep = np.arange(n, dtype=np.int64)
    kept = np.ones(n, dtype=bool)
    for p in np.unique(i):  # only points with a close earlier neighbour can be dropped
        candidates = j[starts[p]:starts[p + 1]]
        alive = candidates[kept[candidates]]
        if len(alive):
            kept[p] = False
            rep[p] = alive[0]
    return rep
