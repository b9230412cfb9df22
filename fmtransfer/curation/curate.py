"""The curation recipe over an embedding array: hierarchical k-means -> dedup (inside its clusters) -> balanced sampling."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fmtransfer.curation.checks import CheckSettings
from fmtransfer.curation.dedup import near_duplicates
from fmtransfer.curation.kmeans import Hierarchy, Resample, check_embeddings, hierarchical_kmeans
from fmtransfer.curation.sampling import WithinCluster, balanced_sample, stratified_sample
from fmtransfer.errors import ConfigError, DataError


@dataclass
class CurationSettings:
    """``curation`` in the config.

    Attributes:
        target_size: how many samples to keep: a count (>= 1) or a fraction of the pool (< 1).
        levels: clusters per level of the tree, finest first and decreasing, e.g. [1000, 100, 10].
        resampling_steps: resampling refinements per level (0: plain k-means).
        resample: which points re-fit the centroids: closest (to the centroid) or random.
        resample_per_cluster: points per cluster in a refit (null: half the mean cluster size, at most 64).
        init: how every k-means fit is seeded: kmeans++ (separated small modes get a seed) or random (FAISS's
            uniform draw, which follows density).
        niter: k-means iterations per fit.
        resample_sample: a level of more than k x this many points is refined on a random sample of this many
            points per cluster, with lighter seeding, and every point is assigned once at the end: faster on a
            million points, but it rebalanced less (docs/curation.md, Speed), so it is off by default (null: the
            paper's scheme, every point re-assigned at every step).
        refit_niter: k-means iterations of every resampling refit (null: ``niter``); the first fit of a level runs
            ``niter``. 5 kept the balance of 20 on a million embeddings at half the time (docs/curation.md).
        within_cluster: which points a finest cluster gives once its quota is known: random or closest.
        balance_floor: this share of the budget is spread over the finest clusters in proportion to their size,
            the rest balanced (0: plain balance, which can starve a class whose samples look alike; 1: proportional).
        dedup: remove near-duplicates first: a point within dedup_threshold (cosine) of a kept one among its
            dedup_k nearest neighbours is dropped (never by a chain of close points).
        dedup_threshold: a cosine similarity in (0, 1] (after centring).
        dedup_quantile: when set (e.g. 0.01), the threshold is read from the pool instead: the similarity above
            which this share of the points' nearest-neighbour similarities lie (it adapts to the embedding).
        dedup_relative: when set (0.1, the default), a pair must also be within this fraction of its own
            neighbourhood's distance (to the dedup_k-th neighbour of the denser of the two). On Fashion-MNIST a
            supervised model's embeddings put 30% of the pool within 0.99 of a neighbour (two thirds of the
            trousers): alike, not copies. null: the threshold alone.
        stratify_by: null, label or region: the budget is split over strata so that none vanishes.
        gpu: FAISS on GPU (needs faiss-gpu).
        checks: when the report warns (:class:`fmtransfer.curation.checks.CheckSettings`).
    """

    target_size: float = 0.2
    levels: list[int] = field(default_factory=lambda: [100, 10])
    resampling_steps: int = 10
    resample: Literal["closest", "random"] = "closest"
    resample_per_cluster: int | None = None
    init: Literal["kmeans++", "random"] = "kmeans++"
    niter: int = 20
    refit_niter: int | None = 5
    resample_sample: int | None = None
    within_cluster: Literal["random", "closest"] = "random"
    balance_floor: float = 0.5
    dedup: bool = True
    dedup_threshold: float = 0.99
    dedup_quantile: float | None = None
    dedup_relative: float | None = 0.1
    dedup_k: int = 8
    stratify_by: Literal["label", "region"] | None = None
    gpu: bool = False
    checks: CheckSettings = field(default_factory=CheckSettings)

    def __post_init__(self) -> None:
        if self.target_size <= 0 or (self.target_size >= 1 and self.target_size != int(self.target_size)):
            raise ConfigError(f"curation.target_size={self.target_size}: give a count >= 1 or a fraction in (0, 1)")
        self.levels = [int(k) for k in self.levels]
        if not self.levels or min(self.levels) < 1 or any(b >= a for a, b in zip(self.levels, self.levels[1:],
                                                                                  strict=False)):
            raise ConfigError(f"curation.levels={self.levels}: give decreasing positive cluster counts, finest first")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise ConfigError(f"curation.dedup_threshold={self.dedup_threshold}: a cosine similarity in (0, 1] at "
                              f"which two embeddings count as near-duplicates (1: exact copies only)")
        if self.dedup_quantile is not None and not 0.0 < self.dedup_quantile < 1.0:
            raise ConfigError(f"curation.dedup_quantile={self.dedup_quantile}: a share of the pool's nearest-"
                              f"neighbour similarities; expected a value in (0, 1), e.g. 0.01, or null")
        if self.dedup_relative is not None and not 0.0 < self.dedup_relative < 1.0:
            raise ConfigError(f"curation.dedup_relative={self.dedup_relative}: a fraction of the pool's typical "
                              f"distance to a neighbour; expected a value in (0, 1), e.g. 0.05, or null")
        if not 0.0 <= self.balance_floor <= 1.0:
            raise ConfigError(f"curation.balance_floor={self.balance_floor}: the share of the budget spread "
                              f"in proportion to cluster size; expected a value in [0, 1] (0: plain balance)")
        if self.resampling_steps < 0 or self.niter < 1 or self.dedup_k < 1:
            raise ConfigError("curation.resampling_steps >= 0, curation.niter >= 1 and curation.dedup_k >= 1")
        for key in ("refit_niter", "resample_sample"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"curation.{key}={getattr(self, key)}: expected a positive integer, or null")

    def target(self, pool: int) -> int:
        """The number of samples to keep from a pool of ``pool``."""
        n = int(self.target_size) if self.target_size >= 1 else int(round(self.target_size * pool))
        if n > pool:
            raise DataError(f"curation.target_size={self.target_size:g} asks for {n} samples, but the pool "
                            f"holds {pool}")
        return max(1, n)


@dataclass
class Curation:
    """What :func:`curate_embeddings` found and chose (indices into the embedding rows)."""

    selected: np.ndarray
    representative: np.ndarray
    tree: Hierarchy
    seconds: dict[str, float]
    dedup_threshold: float | None = None  # the similarity used (read from the pool with dedup_quantile)
    # with dedup_relative: the median k-th neighbour similarity and how many the threshold alone would drop
    dedup_stats: dict[str, Any] = field(default_factory=dict)
    # what the sampling had to give up, in words: a stratum short of its share after dedup
    notes: list[str] = field(default_factory=list)

    @property
    def kept(self) -> np.ndarray:
        """(n,) bool: not a near-duplicate of an earlier row."""
        return self.representative == np.arange(len(self.representative))


def curate_embeddings(x: np.ndarray, settings: CurationSettings, *, strata: np.ndarray | None = None,
                      seed: int = 0, log=print) -> Curation:
    """x: (n, d) embeddings (a memmap is fine) -> the chosen rows, the dedup groups and the cluster tree."""
    check_embeddings(x, distinct=True)
    n = len(x)
    target = settings.target(n)
    if settings.levels[0] > n:
        raise DataError(f"curation.levels={settings.levels}: k={settings.levels[0]} is larger than the "
                        f"{n} points to cluster")
    seconds: dict[str, Any] = {}
    t = time.perf_counter()
    tree = hierarchical_kmeans(x, settings.levels, steps=settings.resampling_steps,
                               how=Resample(settings.resample), niter=settings.niter, seed=seed,
                               per_cluster=settings.resample_per_cluster, plusplus=settings.init == "kmeans++",
                               gpu=settings.gpu, refit_niter=settings.refit_niter,
                               sample_per_centroid=settings.resample_sample, checked=True)
    seconds["kmeans"] = time.perf_counter() - t
    log(f"hierarchical k-means {settings.levels}: {seconds['kmeans']:.1f} s")
    t = time.perf_counter()
    threshold, dedup_stats = None, {}
    if settings.dedup:
        # in a large pool, near-duplicates are searched inside the finest clusters (they share one)
        rep, threshold = near_duplicates(x, threshold=settings.dedup_threshold, quantile=settings.dedup_quantile,
                                         k=settings.dedup_k, relative=settings.dedup_relative,
                                         partition=tree.labels, checked=True, stats=dedup_stats)
    else:
        rep = np.arange(n)
    seconds["dedup"] = time.perf_counter() - t
    kept = rep == np.arange(n)
    source = f"the pool's closest {settings.dedup_quantile:g} of pairs" if settings.dedup_quantile else "set"
    if dedup_stats:
        source += (f"; and within {settings.dedup_relative:g} of the distance to the {settings.dedup_k}th neighbour "
                   f"(median {dedup_stats['scale']:.4f}): {dedup_stats['removed_at_threshold']} would have gone at "
                   f"the threshold alone")
    log(f"dedup at cosine {threshold:.4f} ({source}): {n - int(kept.sum())} near-duplicates of {n} removed, "
        f"each within the threshold of one of {len(np.unique(rep[~kept]))} kept samples" if settings.dedup
        else "dedup: off")
    if target > int(kept.sum()):
        raise DataError(f"curation target {target} is larger than the {int(kept.sum())} samples left after dedup "
                        f"removed {n - int(kept.sum())} of {n} at cosine {threshold:.4f}; raise "
                        f"curation.dedup_threshold, lower curation.target_size, or set curation.dedup=false")
    t = time.perf_counter()
    within = WithinCluster(settings.within_cluster)
    notes: list[str] = []
    if strata is not None:
        selected = stratified_sample(tree, target, np.asarray(strata), within=within, x=x, mask=kept, seed=seed,
                                     floor=settings.balance_floor, notes=notes)
        for note in notes:
            log(f"stratify_by={settings.stratify_by}: {note}")
    else:
        selected = balanced_sample(tree, target, within=within, x=x, mask=kept, seed=seed,
                                   floor=settings.balance_floor)
    seconds["sampling"] = time.perf_counter() - t
    return Curation(selected, rep, tree, seconds, threshold, dedup_stats, notes)


def largest_share(labels: np.ndarray, k: int, top_fraction: float = 0.1) -> float:
    """Share of points held by the largest ``top_fraction`` of the ``k`` clusters."""
    sizes = np.sort(np.bincount(labels, minlength=k))[::-1]
    top = max(1, int(round(top_fraction * k)))
    return float(sizes[:top].sum() / max(1, sizes.sum()))
