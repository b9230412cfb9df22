"""The do-no-harm check: does an adapter beat its base on the calibration set, and may it be released?

Pure functions over arrays and headers. ``adapt`` fits the adapter once per cross-validation fold and scores the
held-out calibration samples; these functions turn the paired per-sample scores into a verdict, and ``export`` /
``pipeline`` read that verdict back from the adapter's header (:func:`release_check`).

The verdict rule: ``beats_base`` is true only when the whole confidence interval of the mean paired difference
(adapter minus base) lies above 0. An interval that holds 0 is *inconclusive*, and an inconclusive adapter does not
beat its base: the check asks for evidence of a gain, because shipping an adapter instead of its base is a change
that has to earn its place, and "no measurable difference" leaves the base the safer choice.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fmtransfer.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

BETTER, WORSE, INCONCLUSIVE, UNCHECKED = "better", "worse", "inconclusive", "unchecked"
INTERVAL_METHOD = "paired bootstrap over the calibration samples (percentile)"


class DoNoHarmRefused(ArtifactError):
    """An adapter that did not beat its base (or was never checked) was asked to be released without force=true."""


def feasible_folds(labels: np.ndarray | None, n: int, folds: int) -> int:
    """How many stratified folds the calibration set allows: at most ``folds``, and no more than the smallest
    class has samples (each held-out fold then holds every class); without labels (regression), ``n // 2`` at most.

    Returns:
        the fold count, or 0 or 1 when no cross-validation is possible.
    """
    if labels is None:
        return min(folds, n // 2)
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    return min(folds, int(counts[counts > 0].min()) if len(counts) else 0)


def stratified_folds(labels: np.ndarray | None, n: int, folds: int, seed: int) -> np.ndarray:
    """A fold index in ``range(folds)`` for each of ``n`` samples, each class spread evenly over the folds.

    Args:
        labels: (n,) class indices, or None (no strata: one shuffled round robin).
        folds: >= 2, at most :func:`feasible_folds`.
    """
    if folds < 2:
        raise ConfigError(f"do_no_harm: {folds} fold(s) cannot cross-validate; it needs 2 or more")
    strata = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    offset = 0  # classes smaller than `folds` * k start where the last one stopped, so folds stay even in size
    for cls in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == cls))
        out[members] = (offset + np.arange(len(members))) % folds
        offset = (offset + len(members)) % folds
    return out


def bootstrap_interval(differences: np.ndarray, confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (resampling samples with replacement)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        raise ConfigError("do_no_harm: no held-out samples to compare")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # in blocks: resamples x n indices at once can be large
        stop = min(resamples, start + 256)
        means[start:stop] = d[rng.integers(0, d.size, size=(stop - start, d.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def verdict(low: float, high: float) -> str:
    """better (the interval lies above 0), worse (below 0) or inconclusive (it holds 0)."""
    if low > 0:
        return BETTER
    if high < 0:
        return WORSE
    return INCONCLUSIVE


def compare(adapter_scores: np.ndarray, base_scores: np.ndarray, fold: np.ndarray, *, confidence: float,
            resamples: int, seed: int) -> dict[str, Any]:
    """The paired comparison of out-of-fold per-sample scores (higher is better: 1/0 correct for classification,
    minus the squared error for regression).

    Returns:
        ``adapter`` / ``base`` (mean scores), ``difference`` (their difference), ``interval`` [low, high],
        ``verdict``, ``beats_base`` and ``per_fold`` (the difference on each held-out fold).
    """
    a, b = np.asarray(adapter_scores, dtype=np.float64), np.asarray(base_scores, dtype=np.float64)
    if a.shape != b.shape or a.shape != np.shape(fold):
        raise ConfigError(f"do_no_harm: {a.shape} adapter scores, {b.shape} base scores and {np.shape(fold)} fold "
                          f"indices do not pair up")
    diff = a - b
    low, high = bootstrap_interval(diff, confidence, resamples, seed)
    found = verdict(low, high)
    return {"n": int(a.size), "adapter": float(a.mean()), "base": float(b.mean()), "difference": float(diff.mean()),
            "interval": [low, high], "verdict": found, "beats_base": found == BETTER,
            "per_fold": [float(diff[fold == k].mean()) for k in np.unique(fold)]}


def unchecked(reason: str) -> dict[str, Any]:
    """The record of an adapter whose check did not run, and why."""
    return {"checked": False, "verdict": UNCHECKED, "beats_base": None, "reason": reason}


def describe(result: dict[str, Any]) -> str:
    """One line with the figures: ``difference +0.0100 (95% interval -0.0200 to +0.0400, 5 folds, 100 samples,
    against the zero-shot base)``; or why nothing was checked."""
    if not result.get("checked"):
        return f"not checked ({result.get('reason', 'no reason recorded')})"
    low, high = result["interval"]
    return (f"{result['metric']} difference {result['difference']:+.4f} (adapter {result['adapter']:.4f}, base "
            f"{result['base']:.4f}; {result['confidence']:.0%} interval {low:+.4f} to {high:+.4f}; {result['folds']}"
            f"-fold cross-validation on {result['n']} calibration samples, against {result['comparator']}): "
            f"{result['verdict']}")


def release_check(header: dict[str, Any], force: bool, path: str) -> dict[str, Any]:
    """Whether an adapter may be released (by ``export`` or ``pipeline``), from its header's ``do_no_harm``.

    Released: an adapter that beats its base. Refused unless ``force``: one that does not (worse or inconclusive),
    one whose check did not run (``do_no_harm.folds=0``, a calibration set too small) and one written before the
    check existed (no ``do_no_harm`` in its header): for each, nothing shows that it does better than its base.

    Returns:
        what the release records: the header's ``do_no_harm`` (``beats_base``, ``verdict``, the figures) and
        ``forced``.
    Raises:
        DoNoHarmRefused: refused, with the file, the figures and how to override.
    """
    result = header.get("do_no_harm")
    if not isinstance(result, dict):
        result = unchecked("the adapter was written before adapt checked adapters against their base")
    record = {k: v for k, v in result.items() if k != "per_fold"}
    if result.get("beats_base") is True:
        return {**record, "forced": False}
    problem = (f"adapter {path} does not beat its base on its calibration set: {describe(result)}" if result.get("checked")
               else f"adapter {path} was not checked against its base: {describe(result)}")
    if not force:
        raise DoNoHarmRefused(f"{problem}; deploy the base, label more samples and adapt again, or pass force=true to "
                              f"release it anyway")
    log.warning("%s; released anyway (force=true)", problem)
    return {**record, "forced": True}
