"""Monitoring statistics on synthetic arrays: calibrated p-values, power on a shift, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from fmtransfer.errors import DataError
from fmtransfer.monitoring import (
    KnnOod,
    bbsd_test,
    domain_classifier_test,
    estimated_accuracy,
    fit_temperature,
    label_shift_test,
    mmd_test,
    run_tests,
)
from fmtransfer.monitoring.drift import windows
from fmtransfer.monitoring.ood import scaled_k
from fmtransfer.monitoring.reference import build_reference, load_reference


def probs(n: int, rng: np.random.Generator, shift: float = 0.0, classes: int = 4) -> np.ndarray:
    logits = rng.normal(size=(n, classes)) * 2
    logits[:, 0] += shift
    return softmax(logits, axis=1)


def emb(n: int, rng: np.random.Generator, shift: float = 0.0, d: int = 16) -> np.ndarray:
    x = rng.normal(size=(n, d))
    x[:, :3] += shift
    return x


TESTS = {"bbsd": lambda r, c, s: bbsd_test(r["p"], c["p"]),
         "label_shift": lambda r, c, s: label_shift_test(r["p"], c["p"]),
         "mmd": lambda r, c, s: mmd_test(r["e"], c["e"], components=8, permutations=200, seed=s),
         "domain_classifier": lambda r, c, s: domain_classifier_test(r["e"], c["e"], seed=s)}


@pytest.mark.parametrize("test", sorted(TESTS))
def test_same_distribution_rarely_alarms_and_a_shift_always_does(test):
    false_alarms = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        ref = {"p": probs(150, rng), "e": emb(150, rng)}
        same = {"p": probs(100, rng), "e": emb(100, rng)}
        false_alarms += TESTS[test](ref, same, seed).detected
    assert false_alarms <= 3, f"{test}: {false_alarms} of 20 same-distribution draws flagged"
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        ref = {"p": probs(150, rng), "e": emb(150, rng)}
        shifted = {"p": probs(100, rng, shift=3.0), "e": emb(100, rng, shift=1.5)}
        verdict = TESTS[test](ref, shifted, seed)
        assert verdict.detected and verdict.p_value < 0.01, (test, verdict.p_value)


def test_permutation_p_value_is_never_zero():
    rng = np.random.default_rng(0)
    v = mmd_test(emb(50, rng), emb(50, rng, shift=10.0), permutations=99)
    assert v.p_value == pytest.approx(1 / 100) and v.detected


def test_bonferroni_multiplies_the_smallest_class_p_value():
    rng = np.random.default_rng(1)
    ref, cur = probs(80, rng), probs(60, rng, shift=0.8)
    v = bbsd_test(ref, cur)
    from scipy.stats import ks_2samp
    raw = min(ks_2samp(ref[:, c], cur[:, c]).pvalue for c in range(4))
    assert v.p_value == pytest.approx(min(1.0, 4 * raw))
    assert v.details["per_class_p"][v.details["deciding_class"]] == pytest.approx(raw, abs=1e-6)


def test_label_shift_sees_class_frequencies():
    rng = np.random.default_rng(2)
    ref = probs(400, rng)
    one_class = np.eye(4)[np.zeros(100, int)] * 0.9 + 0.025
    assert label_shift_test(ref, one_class).p_value < 1e-6
    assert label_shift_test(ref, probs(100, rng)).p_value > 0.01


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(3)
    true_logits = rng.normal(size=(4000, 5)) * 3
    targets = np.array([rng.choice(5, p=p) for p in softmax(true_logits, axis=1)])
    overconfident = softmax(true_logits * 2.5, axis=1)  # the model's logits are 2.5x too sharp
    t = fit_temperature(overconfident, targets)
    assert t == pytest.approx(2.5, rel=0.08)
    # calibrated, the mean confidence matches the accuracy the labels give
    accuracy = float((true_logits.argmax(1) == targets).mean())
    assert estimated_accuracy(overconfident, t) == pytest.approx(accuracy, abs=0.02)
    assert estimated_accuracy(overconfident, 1.0) > accuracy + 0.05


def test_ood_threshold_is_the_reference_quantile_and_flags_far_samples():
    rng = np.random.default_rng(4)
    here, there = np.eye(16)[0] * 3, np.eye(16)[1] * 3  # two directions: cosine only sees directions

    def cloud(n, centre):
        return emb(n, rng) * 0.5 + centre

    ref = cloud(300, here)
    ood = KnnOod.fit(ref, k=50, quantile=0.9)
    assert ood.threshold == pytest.approx(np.quantile(ood.reference_scores, 0.9))
    assert ood.flags(ood.reference_scores).mean() == pytest.approx(0.1, abs=0.01)
    # leave-one-out: a reference sample's own copy is not its neighbour
    assert np.all(ood.reference_scores > 0)
    # in-distribution flagged at about 1 - quantile, a different cluster nearly always
    assert ood.flags(ood.score(cloud(300, here))).mean() < 0.2
    assert ood.flags(ood.score(cloud(100, there))).mean() > 0.95
    assert ood.k == 1  # k=50 is for 50,000 embeddings: scaled to 300
    assert KnnOod.fit(ref[:10], k=50, scale_k=False).k == 9  # capped by the reference's size
    assert [scaled_k(50, n) for n in (500, 4000, 50_000, 10**6)] == [1, 4, 50, 1000]


def test_refusals():
    rng = np.random.default_rng(5)
    p, e = probs(50, rng), emb(50, rng)
    bad = p.copy()
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        bbsd_test(p, bad)
    with pytest.raises(DataError, match="at least 5 samples"):
        bbsd_test(p, p[:3])
    with pytest.raises(DataError, match="different models"):
        mmd_test(e, emb(50, rng, d=8))
    with pytest.raises(DataError, match="different backbones"):
        KnnOod.fit(e).score(emb(5, rng, d=8))
    verdicts = run_tests({"probs": p, "embeddings": None}, {"probs": p, "embeddings": None})
    assert verdicts["bbsd"].skipped is None and verdicts["mmd"].skipped and verdicts["domain_classifier"].skipped
    assert verdicts["mmd"].detected is None and "embedding" in verdicts["mmd"].skipped


def test_windows_follow_the_order():
    order = np.array([5, 1, 4, 2, 3, 9, 8, 7, 6, 10, 11])
    parts = windows(order, 4)
    assert [order[w].tolist() for w in parts] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert len(windows(np.arange(9), 4)) == 2  # a 1-sample tail joins the window before


def test_reference_round_trip_refuses_edits(tmp_path):
    rng = np.random.default_rng(6)
    p, e, y = probs(60, rng), emb(60, rng).astype(np.float32), rng.integers(0, 4, 60)
    settings = {"pca_components": 4, "ood_k": 10, "ood_quantile": 0.95, "ood_scale_k": False, "ood_bank": "train"}
    ref = build_reference({"sha256": "ab" * 32}, {"recipe": "r", "split": "val", "fingerprint": "f", "n": 60},
                          settings, p, e, y, ood_bank=emb(90, rng))
    assert ref.ood.bank.shape == (90, 16) and ref.ood.k == 10
    path = ref.save(tmp_path, "ref")
    back = load_reference(path)
    assert back.temperature == pytest.approx(ref.temperature) and back.ood.threshold == pytest.approx(ref.ood.threshold)
    np.testing.assert_allclose(back.pca(e), ref.pca(e), atol=1e-6)
    np.testing.assert_allclose(back.ood.score(e), ref.ood.score(e), atol=1e-6)  # the bank came back too
    assert back.matches("ab" * 32, "f", settings) == []
    assert back.matches("cd" * 32, "f", {**settings, "ood_k": 5})  # another model and setting: recompute
    npz = tmp_path / "ref.npz"
    npz.write_bytes(npz.read_bytes()[:-10] + b"0123456789")
    from fmtransfer.errors import ArtifactError
    with pytest.raises(ArtifactError, match="changed"):
        load_reference(path)
