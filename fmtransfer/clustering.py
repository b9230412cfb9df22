"""k-means on FAISS with k-means++ seeding, and nearest-centroid assignment in bounded batches.

Shared by data curation (``fmtransfer.curation``) and the diverse calibration sets of adapters
(``fmtransfer.adapters.calibration``). x: (n, d) float32; memory-mapped arrays work.
"""

from __future__ import annotations

import numpy as np

from fmtransfer.errors import DataError

ASSIGN_BATCH = 65_536


PLUSPLUS_BLOCK = 32  # seeds between distance updates in k-means++ (a tuning of speed only: the draw is exact)


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator, block: int = PLUSPLUS_BLOCK) -> np.ndarray:
    """k-means++ seeding (Arthur and Vassilvitskii 2007): each next seed is drawn with probability proportional
    to its squared distance from the seeds so far, so separated modes get a seed whatever their size (FAISS's
    own initialisation draws seeds uniformly, i.e. in proportion to density). x: (m, d) -> (k, d) float32.

    The draw is exact, but the distances are brought up to date only every ``block`` seeds, in one matrix product
    (a read of x per block instead of per seed): between updates a candidate is drawn from the stale distances and
    kept with probability (its distance to all seeds so far) / (its stale distance), which is rejection sampling
    from the up-to-date distribution, as the distances only shrink."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.einsum("ij,ij->i", x, x)
    chosen = [int(rng.integers(len(x)))]
    closest = _sq_dist(x, norms, chosen)[:, 0]
    pending: list[int] = []  # seeds not yet folded into ``closest``
    cumulative, rejected = np.cumsum(closest, dtype=np.float64), 0
    while len(chosen) < k:
        if cumulative[-1] <= 0:  # fewer distinct points than k: any point
            chosen.append(int(rng.integers(len(x))))
            continue
        pick = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(x) - 1)
        stale = float(closest[pick])
        fresh = min(stale, float(np.min(((x[pending] - x[pick]) ** 2).sum(axis=1)))) if pending else stale
        if rng.random() * stale < fresh:
            chosen.append(pick)
            pending.append(pick)
        else:
            rejected += 1
        if len(pending) >= block or rejected >= block:  # stale enough: one product updates every distance
            if pending:
                np.minimum(closest, _sq_dist(x, norms, pending).min(axis=1), out=closest)
            pending, rejected = [], 0
            cumulative = np.cumsum(closest, dtype=np.float64)
    return x[np.asarray(chosen)]


def _sq_dist(x: np.ndarray, norms: np.ndarray, rows: list[int]) -> np.ndarray:
    """(m, len(rows)) squared distances from every row of x to x[rows], clipped at 0."""
    return np.maximum(norms[:, None] - 2 * (x @ x[rows].T) + norms[rows][None, :], 0)


PLUSPLUS_POINTS_PER_CENTROID = 16


def kmeans(x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, init: np.ndarray | None = None,
           max_points_per_centroid: int = 256, plusplus: bool = True, gpu: bool = False,
           plusplus_per_centroid: int = PLUSPLUS_POINTS_PER_CENTROID) -> np.ndarray:
    """FAISS k-means. x: (n, d) float32 -> centroids (k, d) float32.

    FAISS trains on at most ``k * max_points_per_centroid`` points (a random sample), which bounds memory and
    time for large n; assign everything afterwards with :func:`assign`. Unless ``init`` is given, the seeds are
    k-means++ on a sample of ``plusplus_per_centroid * k`` of those points (``plusplus=False``: FAISS's uniform
    random seeds). k-means++ is sequential: each of the k seeds reads that whole sample once.
    """
    import faiss

    n, d = x.shape
    if k < 1 or k > n:
        raise DataError(f"k-means with k={k} needs 1 <= k <= the number of points ({n})")
    km = faiss.Kmeans(d, int(k), niter=int(niter), seed=int(seed), verbose=False, gpu=gpu,
                      max_points_per_centroid=int(max_points_per_centroid), min_points_per_centroid=1)
    sample = x
    if n > k * max_points_per_centroid:  # subsample here, so a memmap is read once, in order
        rng = np.random.default_rng(seed)
        sample = x[np.sort(rng.choice(n, size=k * max_points_per_centroid, replace=False))]
    if init is None and plusplus and k > 1:
        rng = np.random.default_rng(seed + 1)
        m = min(len(sample), k * plusplus_per_centroid)
        init = kmeans_plusplus(sample[rng.choice(len(sample), size=m, replace=False)] if m < len(sample) else sample,
                               k, rng)
    km.train(np.ascontiguousarray(sample, dtype=np.float32),
             init_centroids=None if init is None else np.ascontiguousarray(init, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32)


def assign(x: np.ndarray, centroids: np.ndarray, batch: int = ASSIGN_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every point, in batches (no n x k matrix is held).

    Returns:
        labels: (n,) int64; sq_dist: (n,) float32 squared L2 distance to that centroid.
    """
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), batch):
        d, i = index.search(np.ascontiguousarray(x[start:start + batch], dtype=np.float32), 1)
        labels[start:start + batch], dist[start:start + batch] = i[:, 0], d[:, 0]
    return labels, dist
