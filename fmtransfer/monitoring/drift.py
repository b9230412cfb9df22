"""Two-sample drift tests between a reference and a current set of model outputs, each a :class:`DriftVerdict`.

- ``bbsd``: black-box shift detection (Lipton et al. 2018; Rabanser et al. 2019, "Failing Loudly", its best
  performer): a two-sample Kolmogorov-Smirnov test on each class probability, Bonferroni-corrected over classes.
- ``mmd``: maximum mean discrepancy between PCA-reduced embeddings (PCA fitted on a random half of the reference,
  the test run on the other half: a PCA fitted on the very samples it compares gives them more variance along its
  axes than any new sample, and the test then alarms on same-distribution data), RBF kernel with
  the median-heuristic bandwidth, permutation p-value ``(1 + #{permuted >= observed}) / (1 + n_permutations)``
  (the observed split counts as one permutation, so p is never 0).
- ``domain_classifier``: on the same PCA as ``mmd``, a logistic regression told to separate reference from current (balanced class weights)
  on half the samples; its AUC on the other, held-out half. p-value: the one-sided Mann-Whitney U test of the
  held-out scores (AUC = U / (n_cur n_ref), so it tests AUC = 0.5 exactly and stays valid for unequal sizes).
- ``label_shift``: the predicted-class counts of both sets, chi-square test of homogeneity (a 2 x C contingency
  table, so the reference's own sampling noise counts too).

Inputs are arrays: ``probs`` (n, C) softmax, ``embeddings`` (n, d). Every test refuses NaN or infinite values and
sets it needs more samples than it has (a :class:`~fmtransfer.errors.DataError` naming the test and the counts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from fmtransfer.errors import ConfigError, DataError

# the fewest samples per side each test is run on: below these the test has no power worth reporting
MIN_SAMPLES = {"bbsd": 5, "mmd": 5, "domain_classifier": 10, "label_shift": 5}
TESTS = ("bbsd", "mmd", "domain_classifier", "label_shift")


def check_test_settings(alpha: float, tests: tuple[str, ...], permutations: int, key: str = "monitor") -> None:
    """The drift tests' settings as ``fmtransfer monitor`` and ``predict monitor.enabled=true`` both take them.

    Raises:
        ConfigError: naming ``<key>.alpha``, ``<key>.tests`` or ``<key>.permutations`` and what is expected.
    """
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"{key}.alpha={alpha} must be between 0 and 1 (e.g. 0.05)")
    unknown = sorted(set(tests) - set(TESTS))
    if unknown:
        raise ConfigError(f"{key}.tests has unknown test(s) {unknown}; choose from {list(TESTS)}")
    if permutations < 19:
        raise ConfigError(f"{key}.permutations={permutations} must be >= 19 (the smallest p-value is "
                          f"1 / (1 + permutations))")
NEEDS = {"bbsd": "probs", "label_shift": "probs", "mmd": "embeddings", "domain_classifier": "embeddings"}


@dataclass
class DriftVerdict:
    """One test's answer.

    Attributes:
        test: its name (one of ``TESTS``).
        detected: p_value < alpha; None when the test was skipped.
        statistic: the test statistic (KS D of the deciding class, MMD^2, held-out AUC, chi-square).
        p_value: its p-value (Bonferroni-corrected for BBSD); None when skipped.
        alpha: the significance level.
        n_reference, n_current: samples compared.
        details: test-specific figures (per-class p-values, bandwidth, class counts, ...).
        skipped: why the test did not run, else None.
    """

    test: str
    detected: bool | None
    statistic: float | None
    p_value: float | None
    alpha: float
    n_reference: int
    n_current: int
    details: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def skip(cls, test: str, reason: str, alpha: float, n_reference: int, n_current: int) -> DriftVerdict:
        return cls(test, None, None, None, alpha, n_reference, n_current, skipped=reason)


def check_finite(x: np.ndarray, what: str, ndim: int = 2) -> np.ndarray:
    """``x`` as a float64 array of ``ndim`` dimensions with only finite values.

    Raises:
        DataError: naming ``what``, the shape or the count of NaN / infinite values.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != ndim:
        raise DataError(f"{what}: expected a {ndim}-d array, got shape {x.shape}")
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(len(x), -1).any(1)) if ndim > 1 else np.flatnonzero(bad)
        raise DataError(f"{what}: {int(bad.sum())} NaN or infinite values in {len(rows)} samples (first rows "
                        f"{rows[:5].tolist()}); the model or its inputs are broken")
    return x


def _check_pair(ref: np.ndarray, cur: np.ndarray, what: str, test: str) -> tuple[np.ndarray, np.ndarray]:
    ref, cur = check_finite(ref, f"reference {what}"), check_finite(cur, f"current {what}")
    if ref.shape[1] != cur.shape[1]:
        raise DataError(f"{test}: reference {what} have {ref.shape[1]} columns, current {what} {cur.shape[1]}; they "
                        f"come from different models (another backbone or head)")
    need = MIN_SAMPLES[test]
    if len(ref) < need or len(cur) < need:
        raise DataError(f"{test}: needs at least {need} samples on each side; got {len(ref)} reference and "
                        f"{len(cur)} current")
    return ref, cur


def bbsd_test(ref_probs: np.ndarray, cur_probs: np.ndarray, alpha: float = 0.05) -> DriftVerdict:
    """KS test per class probability; p = min(1, C x the smallest per-class p) (Bonferroni).

    Args:
        ref_probs, cur_probs: (n_ref, C), (n_cur, C) softmax outputs.
    """
    ref, cur = _check_pair(ref_probs, cur_probs, "probabilities", "bbsd")
    results = [stats.ks_2samp(ref[:, c], cur[:, c]) for c in range(ref.shape[1])]
    p_values = np.array([r.pvalue for r in results])
    worst = int(p_values.argmin())
    p = float(min(1.0, p_values[worst] * len(p_values)))
    return DriftVerdict("bbsd", p < alpha, float(results[worst].statistic), p, alpha, len(ref), len(cur),
                        {"per_class_p": p_values.round(6).tolist(), "deciding_class": worst,
                         "correction": f"Bonferroni over {len(p_values)} classes"})


def pca_split(n: int, seed: int = 0) -> np.ndarray:
    """(n,) bool: the reference samples the PCA is fitted on (a random half); the others are compared."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[: n // 2]] = True
    return mask


def held_out_pca(ref: np.ndarray, components: int, seed: int = 0) -> tuple[Pca, np.ndarray]:
    """A PCA fitted on half of ``ref``, and the other half to compare."""
    mask = pca_split(len(ref), seed)
    return Pca(ref[mask], components), ref[~mask]


class Pca:
    """PCA fitted on the reference (centred, top ``components`` directions of its SVD)."""

    def __init__(self, reference: np.ndarray, components: int):
        x = check_finite(reference, "reference embeddings")
        self.mean = x.mean(0)
        k = max(1, min(int(components), x.shape[0] - 1, x.shape[1]))
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.components = vt[:k]

    @classmethod
    def from_arrays(cls, mean: np.ndarray, components: np.ndarray) -> Pca:
        pca = cls.__new__(cls)
        pca.mean, pca.components = np.asarray(mean, np.float64), np.asarray(components, np.float64)
        return pca

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape[1] != self.mean.shape[0]:
            raise DataError(f"embeddings of dimension {x.shape[1]} given to a PCA fitted on dimension "
                            f"{self.mean.shape[0]}: reference and current come from different backbones")
        return (x - self.mean) @ self.components.T


def _sq_distances(x: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(1)
    return np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)


def mmd_test(ref_emb: np.ndarray, cur_emb: np.ndarray, alpha: float = 0.05, *, components: int = 32,
             permutations: int = 500, seed: int = 0, pca: Pca | None = None) -> DriftVerdict:
    """MMD^2 between PCA-reduced embeddings, with a permutation p-value.

    Args:
        ref_emb, cur_emb: (n_ref, d), (n_cur, d) embeddings.
        components: PCA dimensions (capped by the reference's size and d); ignored when ``pca`` is given.
        permutations: random relabellings of the pooled samples.
        pca: a PCA fitted earlier on reference samples other than ``ref_emb`` (stored reference statistics); without
            it, half of ``ref_emb`` fits one and the other half is compared.

    The statistic is the biased estimate ``s^T K s`` (s: +1/m on reference, -1/n on current); with an RBF kernel it
    differs from the unbiased one by a constant for fixed sizes, so the permutation test is the same.
    """
    ref, cur = _check_pair(ref_emb, cur_emb, "embeddings", "mmd")
    if pca is None:
        pca, ref = held_out_pca(ref, components, seed)
    z = np.concatenate([pca(ref), pca(cur)])
    d2 = _sq_distances(z)
    m, n = len(ref), len(cur)
    off = d2[np.triu_indices(len(z), 1)]
    bandwidth2 = float(np.median(off[off > 0])) if (off > 0).any() else 1.0
    kernel = np.exp(-d2 / bandwidth2)
    signs = np.concatenate([np.full(m, 1.0 / m), np.full(n, -1.0 / n)])
    observed = float(signs @ kernel @ signs)
    rng = np.random.default_rng(seed)
    perm = np.stack([signs[rng.permutation(m + n)] for _ in range(int(permutations))], axis=1)
    null = ((kernel @ perm) * perm).sum(0)
    exceed = int((null >= observed - 1e-12).sum())
    p = (1 + exceed) / (1 + int(permutations))
    return DriftVerdict("mmd", p < alpha, observed, p, alpha, m, n,
                        {"components": int(pca.components.shape[0]), "bandwidth": float(np.sqrt(bandwidth2)),
                         "permutations": int(permutations), "p_value_rule": "(1 + #{perm >= observed}) / (1 + n_perm)"})


def domain_classifier_test(ref_emb: np.ndarray, cur_emb: np.ndarray, alpha: float = 0.05, *, seed: int = 0,
                           pca: Pca | None = None, components: int = 32, c: float = 1.0) -> DriftVerdict:
    """Held-out AUC of a reference-vs-current logistic regression; Mann-Whitney U p-value on the held-out fold.

    Args:
        pca: a PCA fitted on reference samples other than ``ref_emb`` (as for :func:`mmd_test`); without it, half
            of ``ref_emb`` fits one and the other half is compared.
        c: inverse L2 strength of the logistic regression.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    ref, cur = _check_pair(ref_emb, cur_emb, "embeddings", "domain_classifier")
    if pca is None:
        pca, ref = held_out_pca(ref, components, seed)
    x = np.concatenate([pca(ref), pca(cur)])
    y = np.concatenate([np.zeros(len(ref), int), np.ones(len(cur), int)])
    x_fit, x_held, y_fit, y_held = train_test_split(x, y, test_size=0.5, stratify=y, random_state=seed)
    scaler = StandardScaler().fit(x_fit)
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=1000)
    clf.fit(scaler.transform(x_fit), y_fit)
    scores = clf.decision_function(scaler.transform(x_held))
    auc = float(roc_auc_score(y_held, scores))
    p = float(stats.mannwhitneyu(scores[y_held == 1], scores[y_held == 0], alternative="greater").pvalue)
    return DriftVerdict("domain_classifier", p < alpha, auc, p, alpha, len(ref), len(cur),
                        {"held_out": {"reference": int((y_held == 0).sum()), "current": int((y_held == 1).sum())},
                         "p_value_rule": "one-sided Mann-Whitney U of the held-out scores (tests AUC = 0.5)"})


def label_shift_test(ref_probs: np.ndarray, cur_probs: np.ndarray, alpha: float = 0.05) -> DriftVerdict:
    """Chi-square test of homogeneity between the predicted-class counts of reference and current."""
    ref, cur = _check_pair(ref_probs, cur_probs, "probabilities", "label_shift")
    k = ref.shape[1]
    counts = np.stack([np.bincount(ref.argmax(1), minlength=k), np.bincount(cur.argmax(1), minlength=k)])
    used = counts.sum(0) > 0
    table = counts[:, used]
    if table.shape[1] < 2:  # one class predicted everywhere, on both sides: nothing moved
        statistic, p = 0.0, 1.0
    else:
        result = stats.chi2_contingency(table, correction=False)
        statistic, p = float(result.statistic), float(result.pvalue)
    return DriftVerdict("label_shift", p < alpha, statistic, p, alpha, len(ref), len(cur),
                        {"reference_counts": counts[0].tolist(), "current_counts": counts[1].tolist(),
                         "current_freq": (counts[1] / counts[1].sum()).round(4).tolist(),
                         "reference_freq": (counts[0] / counts[0].sum()).round(4).tolist()})


def run_tests(reference: Mapping[str, np.ndarray | None], current: Mapping[str, np.ndarray | None], *,
              tests: tuple[str, ...] = TESTS, alpha: float = 0.05, pca: Pca | None = None, components: int = 32,
              permutations: int = 500, seed: int = 0) -> dict[str, DriftVerdict]:
    """Run ``tests`` on ``{"probs", "embeddings"}`` of both sides; a test whose input is missing on either side is
    skipped with the reason (an ONNX model without an embedding output still gets BBSD and label shift).

    ``pca``: fitted on reference samples other than ``reference["embeddings"]`` (see :func:`mmd_test`); without it,
    the embedding tests fit one on half the reference embeddings and compare the other half."""
    unknown = sorted(set(tests) - set(TESTS))
    if unknown:
        raise DataError(f"unknown drift test(s) {unknown}; choose from {', '.join(TESTS)}")
    verdicts: dict[str, DriftVerdict] = {}
    for name in tests:
        need = NEEDS[name]
        ref, cur = reference.get(need), current.get(need)
        n_ref = len(ref) if ref is not None else 0
        n_cur = len(cur) if cur is not None else 0
        if ref is None or cur is None:
            side = "reference" if ref is None else "current"
            verdicts[name] = DriftVerdict.skip(name, f"the {side} model outputs give no {need} (an ONNX export "
                                                     f"without an 'embedding' output, or a head-less model)",
                                               alpha, n_ref, n_cur)
        elif name == "bbsd":
            verdicts[name] = bbsd_test(ref, cur, alpha)
        elif name == "label_shift":
            verdicts[name] = label_shift_test(ref, cur, alpha)
        elif name == "mmd":
            verdicts[name] = mmd_test(ref, cur, alpha, components=components, permutations=permutations,
                                      seed=seed, pca=pca)
        else:
            verdicts[name] = domain_classifier_test(ref, cur, alpha, seed=seed, pca=pca,
                                                    components=components)
    return verdicts


def windows(order: np.ndarray, size: int) -> list[np.ndarray]:
    """Positions into ``order`` grouped into consecutive windows of ``size`` samples, in increasing order; a last
    window shorter than half of ``size`` joins the one before it.

    Args:
        order: (n,) sortable values (timestamps, frame numbers, or row positions).

    Raises:
        DataError: ``size`` < 1 or NaN in ``order``.
    """
    if int(size) < 1:
        raise DataError(f"window size {size} must be >= 1")
    order = np.asarray(order)
    if order.dtype.kind == "f" and np.isnan(order).any():
        raise DataError(f"the order column has {int(np.isnan(order).sum())} empty or NaN values")
    idx = np.argsort(order, kind="stable")
    parts = [idx[i:i + size] for i in range(0, len(idx), size)]
    if len(parts) > 1 and len(parts[-1]) < size / 2:
        parts[-2] = np.concatenate([parts[-2], parts.pop()])
    return parts
