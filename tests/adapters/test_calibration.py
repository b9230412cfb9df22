"""Calibration-set choice: distinct, deterministic, and 'diverse' really covers the space."""

from __future__ import annotations

import numpy as np
import pytest

from fmtransfer.adapters.calibration import parse_strategy, select_diverse, select_random, select_stratified
from fmtransfer.errors import ConfigError


def test_random_is_distinct_and_seeded():
    a = select_random(100, 30, seed=1)
    assert len(set(a)) == 30 and (np.diff(a) > 0).all()
    assert (a == select_random(100, 30, seed=1)).all() and (a != select_random(100, 30, seed=2)).any()


def test_stratified_balances_classes():
    labels = np.repeat(np.arange(5), [400, 50, 50, 50, 50])
    pick = select_stratified(labels, [f"{i:04d}" for i in range(600)], 60, seed=0)
    counts = np.bincount(labels[pick], minlength=5)
    assert counts[0] == 40 and all(abs(c - 5) <= 1 for c in counts[1:])


def test_diverse_covers_small_clusters():
    """One huge cluster and four small ones: diverse picks one from each, random mostly from the big one."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 10
    sizes = [2000, 10, 10, 10, 10]
    x = np.concatenate([c + rng.normal(scale=0.1, size=(n, 16)) for c, n in zip(centres, sizes)]).astype(np.float32)
    cluster = np.repeat(np.arange(5), sizes)
    pick = select_diverse(x, 5, seed=0)
    assert len(set(pick)) == 5 and sorted(cluster[pick].tolist()) == [0, 1, 2, 3, 4]
    randomly = cluster[select_random(len(x), 5, seed=0)]
    assert len(set(randomly.tolist())) < 5


def test_diverse_edge_cases():
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    assert (select_diverse(x, 20, seed=0) == np.arange(20)).all()
    pick = select_diverse(x, 19, seed=0)
    assert len(set(pick)) == 19
    x[3, 1] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        select_diverse(x, 5, seed=0)


def test_strategy_names():
    assert parse_strategy("diverse").value == "diverse"
    with pytest.raises(ConfigError, match="calibration.strategy='smart'.*random, stratified, diverse"):
        parse_strategy("smart")
