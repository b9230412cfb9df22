"""Hierarchical k-means with resampling (Vo et al. 2024), on FAISS.

Plain k-means puts most centroids where the data is dense. The resampling refinement re-fits the centroids on
an equal number of points from each cluster (those nearest its centroid), repeatedly, so that the clusters
spread over the whole support of the data; higher levels cluster the centroids of the level below. Every fit is
seeded with k-means++, so that separated small modes get a centroid of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from fmtransfer.clustering import ASSIGN_BATCH, assign, kmeans
from fmtransfer.errors import DataError

# points per centroid that train the first fit when refinements follow: it only chooses the first resample (FAISS
# trains on up to 256 by default; at k=1000 on a million points that fit cost more than all ten refits)
FIRST_FIT_POINTS = 64
LIGHT_SEED_POINTS = 8  # points per centroid that k-means++ seeds from in a sampled refinement


class Resample(str, Enum):
    """Which points of each cluster re-fit the centroids in a resampling step."""

    CLOSEST = "closest"  # the r points nearest the centroid (the paper's choice)
    RANDOM = "random"  # r random points


def check_embeddings(x: np.ndarray, name: str = "embeddings", batch: int = ASSIGN_BATCH, distinct: bool = False) -> None:
    """Raise DataError for a non-2-D array or one holding NaN/inf, and with ``distinct`` for one whose rows are all
    the same (a constant model, a broken export: nothing to cluster or balance). One pass in batches: a memmap is read
    once and not held."""
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{name}: expected a non-empty (n, d) array, got shape {x.shape}")
    first, varied = np.asarray(x[0]), not distinct
    for start in range(0, len(x), batch):
        chunk = np.asarray(x[start:start + batch])
        if not np.isfinite(chunk).all():
            row = start + int(np.argwhere(~np.isfinite(chunk))[0, 0])
            raise DataError(f"{name}: row {row} holds NaN or inf; embeddings must be finite")
        varied = varied or not (chunk == first).all()
    if not varied:
        raise DataError(f"the {len(x)} {name} are all the same row: the model gives every sample one embedding (a "
                        f"collapsed or untrained model?), so there is nothing to cluster, deduplicate or balance")


def pick_per_cluster(labels: np.ndarray, sq_dist: np.ndarray, r: int, how: Resample,
                     rng: np.random.Generator) -> np.ndarray:
    """Indices of up to ``r`` points of every cluster (all of a smaller one), by ``how``."""
    order = np.lexsort((sq_dist if how is Resample.CLOSEST else rng.random(len(labels)), labels))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(order)) - starts
    return np.sort(order[rank < r])


def resampled_kmeans(x: np.ndarray, k: int, *, steps: int = 10, per_cluster: int | None = None,
                     how: Resample = Resample.CLOSEST, niter: int = 20, seed: int = 0, plusplus: bool = True,
                     gpu: bool = False, refit_niter: int | None = None,
                     sample_per_centroid: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k-means, then ``steps`` resampling refinements: re-fit the centroids on ``per_cluster`` points of each
    cluster, a sample in which every cluster weighs about the same. Default ``per_cluster``: half the mean cluster
    size, at least 1 and at most 64 (which bounds each refit at 64 k points). Every fit is seeded by k-means++
    (``plusplus``): with FAISS's uniform seeds, well-separated small modes that draw no seed stay merged, and a refit
    on a balanced sample cannot undo that. A refit must start afresh: started from the centroids it refines, its
    sample (each centroid's closest points) holds those centroids in place, and nothing leaves a dense region.
    With ``steps`` > 0 the first fit trains on at most 64 points a cluster (it only chooses the first resample) and
    every refit runs ``refit_niter`` iterations (None: ``niter``); on a million points at k=1000, 5-iteration refits
    kept the balance of 20-iteration ones (docs/curation.md, Speed).

    A large pool (more than ``k * sample_per_centroid`` points) is refined on a random sample of that many points,
    and every point is assigned once, at the end; k-means++ seeds from 8 points a cluster. A smaller pool, or
    ``sample_per_centroid=None``, gets the paper's scheme: every refit on the balanced resample of the whole pool,
    every point re-assigned at every step.

    Returns:
        centroids (k, d) float32; labels (n,) int64 of every point of x.
    """
    n = len(x)
    rng = np.random.default_rng(seed)
    work, lighter = x, {}
    if sample_per_centroid is not None and n > k * sample_per_centroid:
        work = np.asarray(x[np.sort(rng.choice(n, size=k * sample_per_centroid, replace=False))])
        # a refit's points are already spread evenly over the clusters, so fewer of them seed each fit
        lighter = {"plusplus_per_centroid": LIGHT_SEED_POINTS}
    first = {"max_points_per_centroid": FIRST_FIT_POINTS} if steps > 0 else {}
    centroids = kmeans(work, k, niter=niter, seed=seed, plusplus=plusplus, gpu=gpu, **first, **lighter)
    r = per_cluster or max(1, min(len(work) // (2 * k), 64))
    for step in range(steps):
        labels, dist = assign(work, centroids)
        chosen = pick_per_cluster(labels, dist, r, how, rng)
        if len(chosen) < k:
            break
        centroids = kmeans(np.asarray(work[chosen]), k, niter=refit_niter or niter, seed=seed + step + 1,
                           plusplus=plusplus, gpu=gpu, **lighter)
    labels, _ = assign(x, centroids)
    return centroids, labels


@dataclass
class Hierarchy:
    """A cluster tree over n points.

    Attributes:
        levels: cluster counts, finest first, e.g. [1000, 100, 10].
        labels: (n,) int64, each point's level-0 cluster.
        parents: parents[t] (levels[t],) int64: the level-(t+1) cluster of each level-t cluster.
        centroids: centroids[t] (levels[t], d) float32.
    """

    levels: list[int]
    labels: np.ndarray
    parents: list[np.ndarray] = field(default_factory=list)
    centroids: list[np.ndarray] = field(default_factory=list)

    def paths(self) -> np.ndarray:
        """(n, len(levels)) int64: each point's cluster at every level, finest first."""
        out = np.empty((len(self.labels), len(self.levels)), dtype=np.int64)
        out[:, 0] = self.labels
        for t, parent in enumerate(self.parents, start=1):
            out[:, t] = parent[out[:, t - 1]]
        return out


def hierarchical_kmeans(x: np.ndarray, levels: list[int], *, steps: int = 10, how: Resample = Resample.CLOSEST,
                        niter: int = 20, seed: int = 0, per_cluster: int | None = None, plusplus: bool = True,
                        gpu: bool = False, refit_niter: int | None = None,
                        sample_per_centroid: int | None = None, checked: bool = False) -> Hierarchy:
    """Level 0 clusters the points; level t clusters the centroids of level t-1. ``levels`` finest first and
    decreasing, e.g. [1000, 100, 10] for a million points. ``checked``: the caller ran :func:`check_embeddings`."""
    if not checked:
        check_embeddings(x)
    if not levels or any(b >= a for a, b in zip(levels, levels[1:], strict=False)):
        raise DataError(f"curation levels {levels}: give decreasing cluster counts, finest first")
    if levels[0] > len(x):
        raise DataError(f"curation levels {levels}: k={levels[0]} is larger than the number of points ({len(x)})")
    fit = {"steps": steps, "per_cluster": per_cluster, "how": how, "niter": niter, "plusplus": plusplus, "gpu": gpu,
           "refit_niter": refit_niter, "sample_per_centroid": sample_per_centroid}
    centroids, labels = resampled_kmeans(x, levels[0], seed=seed, **fit)
    tree = Hierarchy(list(levels), labels, [], [centroids])
    for t, k in enumerate(levels[1:], start=1):
        upper, parent = resampled_kmeans(tree.centroids[-1], k, seed=seed + 1000 * t, **fit)
        tree.centroids.append(upper)
        tree.parents.append(parent)
    return tree
