"""k-means++ seeding with distances updated in blocks: the same draw as the one-seed-at-a-time definition."""

from __future__ import annotations

import itertools

import numpy as np

import fmtransfer.clustering as clustering


def _sequential_probabilities(x: np.ndarray, k: int) -> dict[tuple[int, ...], float]:
    """The k-means++ probability of every ordered seed sequence, from the definition (first uniform, each next
    one in proportion to its squared distance from the seeds so far)."""
    out = {}
    for seq in itertools.permutations(range(len(x)), k):
        p = 1.0 / len(x)
        for j in range(1, k):
            d2 = ((x[:, None, :] - x[list(seq[:j])][None]) ** 2).sum(-1).min(1)
            p *= d2[seq[j]] / d2.sum()
        if p > 0:
            out[seq] = p
    return out


def test_blocked_kmeans_plusplus_draws_from_the_exact_distribution():
    """With one update every 2 seeds, later seeds are drawn from stale distances and kept by rejection: the
    frequencies of the seed sets match the sequential definition."""
    x = np.array([[0, 0], [0, 1], [4, 0], [4, 0.5], [9, 0], [9, 3]], dtype=np.float32)
    k, draws = 4, 4000
    exact: dict[frozenset, float] = {}
    for seq, p in _sequential_probabilities(x, k).items():
        exact[frozenset(seq)] = exact.get(frozenset(seq), 0.0) + p
    rng = np.random.default_rng(0)
    seen: dict[frozenset, int] = {}
    for _ in range(draws):
        seeds = clustering.kmeans_plusplus(x, k, rng, block=2)
        rows = frozenset(int(np.flatnonzero((x == s).all(1))[0]) for s in seeds)
        seen[rows] = seen.get(rows, 0) + 1
    assert set(seen) <= set(exact)
    for rows, p in exact.items():
        sd = np.sqrt(p * (1 - p) / draws)
        assert abs(seen.get(rows, 0) / draws - p) < 5 * sd + 1e-3, (sorted(rows), p)


def test_kmeans_plusplus_updates_distances_once_per_block(monkeypatch):
    """The distances of all points are refreshed once per block of seeds (one matrix product), not once per seed
    as before: the seeding of 1,000 centroids reads the sample about 1000/32 times, not 1,000."""
    calls = []
    inner = clustering._sq_dist

    def counting(x, norms, rows):
        calls.append(len(rows))
        return inner(x, norms, rows)

    monkeypatch.setattr(clustering, "_sq_dist", counting)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(300, 24)) * 4
    x = (centers[rng.integers(300, size=8000)] + rng.normal(size=(8000, 24))).astype(np.float32)
    seeds = clustering.kmeans_plusplus(x, 1000, np.random.default_rng(1))
    assert seeds.shape == (1000, 24) and len(np.unique(seeds, axis=0)) == 1000
    assert calls[0] == 1 and sum(calls) <= 1000  # the first seed alone, then each seed folded in once at most...
    assert len(calls) < 1000 / 8  # ...in few products


def test_kmeans_plusplus_with_fewer_distinct_points_than_k():
    x = np.repeat(np.array([[0, 0], [1, 1]], dtype=np.float32), 10, axis=0)
    seeds = clustering.kmeans_plusplus(x, 5, np.random.default_rng(0))
    assert seeds.shape == (5, 2) and {tuple(s) for s in seeds.tolist()} == {(0.0, 0.0), (1.0, 1.0)}
