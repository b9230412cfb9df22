"""Choosing which region samples to label: pure functions over arrays.

``diverse`` answers "which images should the team label first": k-means on the global backbone's embeddings of
the region's unlabelled train split, and the sample nearest each centroid.
"""

from __future__ import annotations

import csv
from enum import Enum
from pathlib import Path

import numpy as np

from fmtransfer.clustering import kmeans, kmeans_plusplus
from fmtransfer.data.table import stratified_choice
from fmtransfer.errors import ConfigError


class Strategy(str, Enum):
    RANDOM = "random"
    STRATIFIED = "stratified"
    DIVERSE = "diverse"


def parse_strategy(value: str) -> Strategy:
    try:
        return Strategy(value)
    except ValueError:
        raise ConfigError(f"calibration.strategy={value!r}; expected one of: "
                          f"{', '.join(s.value for s in Strategy)}") from None


def manifest_ids(path: str | Path) -> list[str]:
    """The ``id`` column of a calibration manifest, in file order (duplicates dropped, the first kept)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration.manifest={path}: no such file; give a CSV with an id column (e.g. monitor's "
                          f"label_first.csv or curate's curated.csv)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if "id" not in (reader.fieldnames or []):
            raise ConfigError(f"calibration.manifest={path}: no 'id' column (columns: {reader.fieldnames})")
        ids = [row["id"] for row in reader if row["id"]]
    if not ids:
        raise ConfigError(f"calibration.manifest={path} lists no ids")
    return list(dict.fromkeys(ids))


def select_random(n_pool: int, k: int, seed: int) -> np.ndarray:
    """k distinct positions of ``range(n_pool)``, sorted."""
    return np.sort(np.random.default_rng(seed).choice(n_pool, size=k, replace=False))


def select_stratified(labels: np.ndarray, ids: list[str], k: int, seed: int) -> np.ndarray:
    """k positions keeping each label's share (to within one sample). labels: (n,) int."""
    return stratified_choice(labels, ids, k, seed)


def select_diverse(embeddings: np.ndarray, k: int, seed: int, iterations: int = 25) -> np.ndarray:
    """k positions that cover the embedding space: k-means (k-means++ start, FAISS iterations) with k centroids,
    then for each centroid the nearest sample not already taken (centroids served in order of how close their
    best match is).

    Args:
        embeddings: (n, d) float32 features; L2-normalised here, so distances are cosine.
        k: samples to pick, 1 <= k <= n.
    Returns:
        (k,) sorted distinct positions.
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = x.shape
    if not np.isfinite(x).all():
        raise ConfigError("calibration.strategy=diverse: the embeddings hold NaN or inf values")
    if k >= n:
        return np.arange(n)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    # every sample trains (no subsample: a calibration pool is small), from a k-means++ start on all of them
    centroids = kmeans(x, k, niter=iterations, seed=seed, init=kmeans_plusplus(x, k, np.random.default_rng(seed)),
                       max_points_per_centroid=1 << 30)
    index = faiss.IndexFlatL2(d)
    index.add(x)
    neighbours = min(n, 32)
    dist, nearest = index.search(centroids, neighbours)
    taken = np.zeros(n, dtype=bool)
    chosen: list[int] = []
    for c in np.argsort(dist[:, 0], kind="stable"):
        free = [j for j in nearest[c] if j >= 0 and not taken[j]]
        if free:
            taken[free[0]] = True
            chosen.append(int(free[0]))
    if len(chosen) < k:  # centroids whose neighbours were all taken: fill with the samples farthest from any pick
        picked = faiss.IndexFlatL2(d)
        picked.add(x[chosen])
        far, _ = picked.search(x, 1)
        order = [int(j) for j in np.argsort(-far[:, 0], kind="stable") if not taken[j]]
        chosen += order[: k - len(chosen)]
    return np.sort(np.array(chosen, dtype=np.int64))
