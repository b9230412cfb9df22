"""Balanced sampling down a cluster tree: every cluster at every level gets an equal share of the budget
(capped by what it holds), so rare modes keep their samples and dense ones give theirs up."""

from __future__ import annotations

from enum import Enum

import numpy as np

from fmtransfer.clustering import assign
from fmtransfer.curation.kmeans import Hierarchy
from fmtransfer.errors import DataError


class WithinCluster(str, Enum):
    """How the points of a finest-level cluster are chosen once its quota is known."""

    RANDOM = "random"
    CLOSEST = "closest"  # nearest the cluster's centroid first


def waterfill(sizes: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``budget`` over bins as evenly as possible, no bin above its size: the quotas are min(size, level) at
    the highest level the budget allows, found by bisection (the per-cluster cap of Vo et al.'s
    ``find_subcluster_target_size``).

    Args:
        sizes: (k,) int, how many items each bin holds.
    Returns:
        (k,) int64 quotas with sum ``min(budget, sizes.sum())``; leftover units go to random bins at the level.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(min(budget, sizes.sum()))
    lo, hi = 0, int(sizes.max(initial=0))
    while lo < hi:  # the highest level whose fill stays within the budget
        mid = (lo + hi + 1) // 2
        if np.minimum(sizes, mid).sum() <= total:
            lo = mid
        else:
            hi = mid - 1
    quota = np.minimum(sizes, lo)
    left = total - int(quota.sum())
    if left > 0:  # the next level would overshoot: some bins at the level get one more
        quota[rng.choice(np.flatnonzero(sizes > lo), size=left, replace=False)] += 1
    return quota


def balanced_sample(tree: Hierarchy, target: int, *, within: WithinCluster = WithinCluster.RANDOM,
                    x: np.ndarray | None = None, mask: np.ndarray | None = None, seed: int = 0,
                    floor: float = 0.0) -> np.ndarray:
    """Choose ``target`` points, splitting the budget evenly down the tree from its coarsest level.

    Args:
        tree: from :func:`fmtransfer.curation.kmeans.hierarchical_kmeans` over n points.
        within: how points are taken inside a finest cluster (CLOSEST needs ``x``, the (n, d) embeddings).
        mask: (n,) bool, only these points may be chosen (a stratum, the survivors of dedup).
        floor: this share of the budget is spread over the finest clusters in proportion to their size (as a
            random sample would), the rest balanced down the tree. Plain balance can starve a class whose samples
            look alike (it sits in a few clusters and gets a few clusters' quotas); with a floor every group keeps
            about ``floor`` of its pool share at least.
    Returns:
        sorted (target,) int64 point indices.
    """
    n = len(tree.labels)
    allowed = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if target > int(allowed.sum()):
        raise DataError(f"curation target {target} is larger than the {int(allowed.sum())} points available")
    if within is WithinCluster.CLOSEST and x is None:
        raise DataError("within-cluster strategy 'closest' needs the embeddings")
    rng = np.random.default_rng(seed)
    paths = tree.paths()[allowed]
    points = np.flatnonzero(allowed)
    sizes = np.bincount(paths[:, 0], minlength=tree.levels[0])
    floor_quota = _proportional(sizes, int(round(floor * target)))
    quota = floor_quota + _balanced_quotas(tree, sizes - floor_quota, target - int(floor_quota.sum()), rng)
    order = np.argsort(paths[:, 0], kind="stable")
    bounds = np.searchsorted(paths[order, 0], np.arange(tree.levels[0] + 1))
    chosen = []
    for c in np.flatnonzero(quota):
        members = points[order[bounds[c]:bounds[c + 1]]]
        if within is WithinCluster.CLOSEST:
            _, dist = assign(np.asarray(x[members]), tree.centroids[0][c:c + 1])
            chosen.append(members[np.argsort(dist, kind="stable")[:quota[c]]])
        else:
            chosen.append(rng.choice(members, size=int(quota[c]), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _proportional(sizes: np.ndarray, budget: int) -> np.ndarray:
    """``budget`` split in proportion to ``sizes`` by largest remainders (rounding every bin down would hand up to one
    point a bin of the proportional share to the balanced rest, i.e. to the small clusters)."""
    exact = budget * sizes / max(1, sizes.sum())
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(quota - exact, kind="stable")[:budget - int(quota.sum())]] += 1
    return np.minimum(quota, sizes)


def _balanced_quotas(tree: Hierarchy, room: np.ndarray, budget: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Finest-cluster quotas of ``budget`` split evenly down the tree from its coarsest level, no finest cluster
    above its ``room``."""
    top = len(tree.levels) - 1
    # the room of every cluster at every level: its finest clusters' room summed up the tree
    rooms = [room]
    for t in range(top):
        rooms.append(np.bincount(tree.parents[t], weights=rooms[-1], minlength=tree.levels[t + 1]).astype(np.int64))
    quota = waterfill(rooms[top], budget, rng)
    for t in range(top - 1, -1, -1):  # hand each cluster's quota to its children
        child_quota = np.zeros(tree.levels[t], dtype=np.int64)
        for c in np.flatnonzero(quota):
            children = np.flatnonzero(tree.parents[t] == c)
            child_quota[children] = waterfill(rooms[t][children], int(quota[c]), rng)
        quota = child_quota
    return quota


def stratified_sample(tree: Hierarchy, target: int, strata: np.ndarray, *, notes: list[str] | None = None,
                      **kwargs) -> np.ndarray:
    """:func:`balanced_sample` within each stratum (a region, a label), the budget split over strata in
    proportion to their size but at least one point each, so no stratum vanishes. A stratum with fewer points
    left (after dedup, ``mask``) than its share gives all it has, and the rest of its share goes to the others.

    Args:
        notes: when given, a sentence per stratum short of its share is appended (the report and the log say so).
    Returns:
        sorted (target,) int64 point indices.
    """
    names, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
    if target < len(names):
        raise DataError(f"curation target {target} is smaller than the number of strata ({len(names)})")
    mask = kwargs.pop("mask", None)
    allowed = np.ones(len(inverse), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    available = np.bincount(inverse[allowed], minlength=len(names))
    if target > int(available.sum()):
        raise DataError(f"curation target {target} is larger than the {int(available.sum())} points available")
    share = np.maximum(1, np.floor(target * counts / counts.sum()).astype(np.int64))
    budget = np.minimum(share, available)
    if notes is not None:
        notes += _short_strata(names, counts, available, share)
    rng = np.random.default_rng(kwargs.get("seed", 0))
    while budget.sum() > target:
        budget[np.argmax(budget)] -= 1
    while budget.sum() < target:  # rounding leftovers and the shares of strata short of points go to strata with room
        open_ = np.flatnonzero(budget < available)
        weights = counts[open_] / counts[open_].sum()
        budget[rng.choice(open_, p=weights)] += 1
    parts = [balanced_sample(tree, int(b), mask=(inverse == s) & allowed, **kwargs)
             for s, b in enumerate(budget) if b > 0]
    return np.sort(np.concatenate(parts))


def _short_strata(names: np.ndarray, counts: np.ndarray, available: np.ndarray, share: np.ndarray) -> list[str]:
    """A sentence per stratum with fewer points left than its proportional share."""
    short = np.flatnonzero(available < share)
    return [f"stratum {str(names[s])!r} has {int(available[s])} samples left after dedup (of {int(counts[s])}), "
            f"fewer than its share of the target ({int(share[s])}): all {int(available[s])} are taken and the other "
            f"{int(share[s] - available[s])} go to the strata with room" for s in short]
