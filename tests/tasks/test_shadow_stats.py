"""``shadow``'s statistics and verdicts, on arrays: Wilson intervals, the paired gain interval, McNemar, gates,
class lists."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fmtransfer.errors import ConfigError
from fmtransfer.tasks.shadow import (
    INCONCLUSIVE,
    KEEP,
    PROMOTE,
    Gates,
    class_map,
    compare,
    mcnemar_exact,
    paired_interval,
    recommend,
    wilson,
)


def test_wilson_matches_the_textbook_values():
    # Newcombe (1998), table I: 81 of 263 -> 0.2553 to 0.3662; 0 of 10 -> 0 to 0.2775 (95%)
    lo, hi = wilson(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    lo, hi = wilson(0, 10)
    assert lo == 0 and round(hi, 4) == 0.2775
    assert wilson(10, 10)[1] == 1 and wilson(10, 10)[0] < 1  # not degenerate at n successes
    assert wilson(50, 100, 0.99)[0] < wilson(50, 100, 0.95)[0]


def test_mcnemar_exact_is_the_binomial_tail():
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 2 ** 10)
    assert mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 2 ** 10)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_paired_interval_matches_resampling_rows():
    """The multinomial shortcut gives the interval that resampling the rows themselves gives."""
    n, only_c, only_p = 400, 30, 12
    lo, hi = paired_interval(only_c, only_p, n, resamples=20000, seed=1)
    diff = np.r_[np.ones(only_c), -np.ones(only_p), np.zeros(n - only_c - only_p)]
    rng = np.random.default_rng(2)
    means = np.array([diff[rng.integers(0, n, n)].mean() for _ in range(4000)])
    assert lo == pytest.approx(np.quantile(means, 0.025), abs=0.004)
    assert hi == pytest.approx(np.quantile(means, 0.975), abs=0.004)
    assert lo < (only_c - only_p) / n < hi
    assert paired_interval(0, 0, 50) == (0.0, 0.0)  # identical decisions: no difference at all


def test_compare_counts_agreement_and_the_paired_gain():
    targets = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    prod = np.array([0, 1, 2, 0, 1, 2, 1, 2, 0, 0])  # 7 right
    cand = np.array([0, 1, 2, 0, 1, 2, 0, 1, 1, 1])  # 8 right: rows 6, 7 only candidate; row 9 only production
    s = compare(prod, cand, targets, 0.95, 2000, 0)
    assert s["agreement"] == 0.6 and s["disagreements"] == 4
    assert s["production_accuracy"] == 0.7 and s["candidate_accuracy"] == 0.8 and s["gain"] == pytest.approx(0.1)
    assert (s["only_candidate_right"], s["only_production_right"]) == (2, 1)
    assert s["mcnemar_p"] == pytest.approx(1.0)
    unlabelled = compare(prod, cand, None, 0.95, 2000, 0)
    assert "gain" not in unlabelled and unlabelled["agreement"] == 0.6


def _stats(gain_interval, agreement=0.95, n=1000, labels=True):
    s = {"n": n, "confidence": 0.95, "agreement": agreement, "agreement_interval": wilson(round(agreement * n), n)}
    if labels:
        s.update(gain=sum(gain_interval) / 2, gain_interval=gain_interval, candidate_accuracy=0.9,
                 production_accuracy=0.88, mcnemar_p=0.01, only_candidate_right=30, only_production_right=10)
    return s


@pytest.mark.parametrize("interval, ratio, expected", [
    ((0.01, 0.03), 1.0, PROMOTE),        # better, as fast
    ((0.01, 0.03), 2.0, KEEP),           # better but too slow
    ((-0.03, -0.01), 0.5, KEEP),         # worse
    ((-0.01, 0.0), 0.5, KEEP),           # no gain shown: the interval's top is the gate
    ((-0.01, 0.02), 1.0, INCONCLUSIVE),  # the interval spans the gate
    ((-0.01, 0.02), 2.0, KEEP),          # uncertain and too slow
])
def test_recommendation_with_labels(interval, ratio, expected):
    decision, reasons = recommend(_stats(interval), ratio, Gates())
    assert decision == expected
    # the latency is always among the reasons: a ratio near the gate can flip on a busy machine
    assert any(f"{ratio:.2f}x production" in r and "max_latency_ratio" in r for r in reasons)


def test_min_accuracy_gain_moves_the_bar():
    assert recommend(_stats((0.01, 0.03)), 1.0, Gates(min_accuracy_gain=0.02))[0] == INCONCLUSIVE
    assert recommend(_stats((-0.005, 0.01)), 1.0, Gates(min_accuracy_gain=-0.01))[0] == PROMOTE  # non-inferiority


def test_recommendation_without_labels_uses_agreement():
    decision, reasons = recommend(_stats(None, agreement=0.998, labels=False), 0.5, Gates())
    assert decision == PROMOTE and any("no labels" in r for r in reasons)
    decision, reasons = recommend(_stats(None, agreement=0.99, labels=False), 0.5, Gates())
    assert decision == INCONCLUSIVE and any("disagreements.csv" in r for r in reasons)  # lower bound < 0.99
    assert recommend(_stats(None, agreement=0.999, labels=False), 3.0, Gates())[0] == KEEP
    assert recommend(_stats(None, agreement=0.999, labels=False), 3.0, Gates(max_latency_ratio=None))[0] == PROMOTE


@pytest.mark.parametrize("node, key", [({"min_agreement": 1.5}, "min_agreement"),
                                       ({"min_accuracy_gain": "a"}, "min_accuracy_gain"),
                                       ({"max_latency_ratio": 0}, "max_latency_ratio")])
def test_gates_refuse_bad_values(node, key):
    with pytest.raises(ConfigError, match=key):
        Gates(**node)


def test_class_map_reorders_or_refuses():
    np.testing.assert_array_equal(class_map(["a", "b", "c"], ["a", "b", "c"], ("p", "c")), [0, 1, 2])
    np.testing.assert_array_equal(class_map(["a", "b", "c"], ["c", "a", "b"], ("p", "c")), [2, 0, 1])
    with pytest.raises(ConfigError, match=r"only in production: \['c'\], only in candidate: \['d'\]"):
        class_map(["a", "b", "c"], ["a", "b", "d"], ("prod.onnx", "cand.onnx"))
    with pytest.raises(ConfigError, match="different classes"):
        class_map(["a", "b"], ["a", "b", "b"], ("p", "c"))
    with pytest.raises(ConfigError, match="cand.onnx has no class list"):
        class_map(["a"], None, ("prod.onnx", "cand.onnx"))
    assert not math.isnan(wilson(1, 2)[0])


def test_a_missing_model_is_named_by_its_role(tmp_path):
    from fmtransfer.errors import ArtifactError
    from fmtransfer.tasks.shadow import shadow
    from tests.conftest import make_cfg

    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match=r"^production: model=.*nowhere: no such file"):
        shadow(make_cfg("shadow", [f"production={tmp_path / 'nowhere'}", f"candidate={tmp_path / 'empty'}"],
                        tmp_path / "run"))
    with pytest.raises(ArtifactError, match=r"^production: .*empty holds no model"):
        shadow(make_cfg("shadow", [f"production={tmp_path / 'empty'}", f"candidate={tmp_path / 'nowhere'}"],
                        tmp_path / "run2"))
