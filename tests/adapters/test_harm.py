"""The do-no-harm statistics and release rule, on made-up per-sample scores."""

from __future__ import annotations

import numpy as np
import pytest

from fmtransfer.adapters.harm import (
    BETTER,
    INCONCLUSIVE,
    WORSE,
    DoNoHarmRefused,
    bootstrap_interval,
    compare,
    feasible_folds,
    release_check,
    stratified_folds,
)
from fmtransfer.errors import ConfigError


def _scores(n: int, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    return (rng.random(n) < accuracy).astype(float)


@pytest.mark.parametrize(("adapter_acc", "base_acc", "expected"),
                         [(0.95, 0.6, BETTER), (0.6, 0.95, WORSE)])
def test_clear_gain_or_loss_gets_its_verdict(adapter_acc, base_acc, expected):
    rng = np.random.default_rng(0)
    a, b = _scores(200, adapter_acc, rng), _scores(200, base_acc, rng)
    fold = stratified_folds(None, 200, 5, 0)
    r = compare(a, b, fold, confidence=0.95, resamples=2000, seed=0)
    assert r["verdict"] == expected and r["beats_base"] is (expected == BETTER)
    assert r["difference"] == pytest.approx(a.mean() - b.mean())
    low, high = r["interval"]
    assert low < r["difference"] < high
    assert len(r["per_fold"]) == 5 and np.mean(r["per_fold"]) == pytest.approx(r["difference"], abs=0.02)


def test_equal_models_are_inconclusive_and_do_not_beat_the_base():
    same = _scores(100, 0.9, np.random.default_rng(1))
    r = compare(same, same.copy(), stratified_folds(None, 100, 3, 0), confidence=0.95, resamples=500, seed=0)
    assert r["interval"] == [0.0, 0.0] and r["verdict"] == INCONCLUSIVE and r["beats_base"] is False


def test_a_small_gain_on_few_samples_is_inconclusive():
    # the adapter fixes 2 samples and breaks 1 of 50: a gain of 0.02 that 50 samples cannot tell from none
    a, b = np.ones(50), np.ones(50)
    b[:2] = 0
    a[10] = 0
    r = compare(a, b, stratified_folds(None, 50, 5, 0), confidence=0.95, resamples=2000, seed=0)
    assert r["difference"] == pytest.approx(0.02) and r["interval"][0] < 0 < r["interval"][1]
    assert r["verdict"] == INCONCLUSIVE and not r["beats_base"]


def test_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    covered = 0
    for i in range(200):
        d = rng.normal(0.3, 1.0, size=80)
        low, high = bootstrap_interval(d, 0.95, 400, seed=i)
        covered += low <= 0.3 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_stratified_folds_spread_each_class_over_every_fold():
    labels = np.repeat(np.arange(4), [3, 5, 7, 10])
    fold = stratified_folds(labels, len(labels), 3, seed=0)
    assert set(fold) == {0, 1, 2}
    for c in range(4):
        counts = np.bincount(fold[labels == c], minlength=3)
        assert counts.min() >= 1 and counts.max() - counts.min() <= 1
    sizes = np.bincount(fold)
    assert sizes.max() - sizes.min() <= 1
    assert (stratified_folds(labels, len(labels), 3, seed=0) == fold).all()  # seeded


def test_feasible_folds_are_limited_by_the_smallest_class():
    labels = np.repeat(np.arange(3), [2, 9, 9])
    assert feasible_folds(labels, len(labels), 5) == 2
    assert feasible_folds(np.repeat(np.arange(3), [1, 9, 9]), 19, 5) == 1
    assert feasible_folds(None, 7, 5) == 3
    with pytest.raises(ConfigError, match="2 or more"):
        stratified_folds(labels, len(labels), 1, 0)


def _checked(beats: bool | None, verdict: str) -> dict:
    return {"do_no_harm": {"checked": True, "beats_base": beats, "verdict": verdict, "difference": -0.012,
                           "interval": [-0.03, 0.006], "confidence": 0.95, "folds": 3, "n": 100,
                           "comparator": "the zero-shot base", "metric": "accuracy", "adapter": 0.97, "base": 0.982}}


def test_release_refuses_an_adapter_that_does_not_beat_its_base(caplog):
    with pytest.raises(DoNoHarmRefused) as e:
        release_check(_checked(False, INCONCLUSIVE), force=False, path="/runs/a/adapter.safetensors")
    message = str(e.value)
    assert "/runs/a/adapter.safetensors" in message and "-0.0120" in message and "force=true" in message
    assert "\n" not in message
    record = release_check(_checked(False, INCONCLUSIVE), force=True, path="x")
    assert record["forced"] is True and record["beats_base"] is False and record["difference"] == -0.012
    assert "released anyway (force=true)" in caplog.text


def test_release_passes_an_adapter_that_beats_its_base():
    record = release_check(_checked(True, BETTER), force=False, path="x")
    assert record["forced"] is False and record["beats_base"] is True and record["verdict"] == BETTER


@pytest.mark.parametrize("header", [{}, {"do_no_harm": {"checked": False, "verdict": "unchecked",
                                                        "beats_base": None, "reason": "do_no_harm.folds=0"}}])
def test_release_refuses_unchecked_and_old_adapters_unless_forced(header):
    with pytest.raises(DoNoHarmRefused, match="not checked against its base.*force=true"):
        release_check(header, force=False, path="old.safetensors")
    assert release_check(header, force=True, path="old.safetensors")["forced"] is True
