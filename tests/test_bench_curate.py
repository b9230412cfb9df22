"""scripts/bench_curate.py's pools and options: the long-tailed pool has the profile it says, and the curation
variants and NAME=N pairs are parsed or refused as the help says."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_curate", ROOT / "scripts" / "bench_curate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_curate", module)
    spec.loader.exec_module(module)
    return module


def test_a_long_tailed_pool_keeps_the_first_class_whole_and_the_last_at_one_in_r(bench):
    ids, targets = np.arange(2000) + 10_000, np.repeat(np.arange(10), 200)
    pool = bench._long_tailed_ids(ids, targets, 10.0, None, seed=0)
    counts = np.bincount(targets[pool - 10_000], minlength=10)
    assert counts[0] == 200 and counts[-1] == 20
    assert np.all(np.diff(counts) <= 0) and counts[5] == int(200 * 10 ** (-5 / 9))
    assert len(np.unique(pool)) == len(pool) and np.all(np.isin(pool, ids))
    limited = bench._long_tailed_ids(ids, targets, 10.0, 500, seed=0)
    small = np.bincount(targets[limited - 10_000], minlength=10)
    assert 490 <= len(limited) <= 500 and small[0] / small[-1] == pytest.approx(10, rel=0.1)
    assert not np.array_equal(limited, bench._long_tailed_ids(ids, targets, 10.0, 500, seed=1))  # the seed draws


def test_curation_variants_are_parsed_and_a_malformed_one_is_refused(bench):
    assert bench._variants(["closest=curation.within_cluster=closest",
                            "both=curation.stratify_by=label;curation.within_cluster=closest"]) == {
        "closest": ["curation.within_cluster=closest"],
        "both": ["curation.stratify_by=label", "curation.within_cluster=closest"]}
    for bad in ("closest", "closest=", "closest=curation.within_cluster", "not a name=a=b",
                "f1=curation.within_cluster=closest"):  # a name that reads as a floor's key
        with pytest.raises(SystemExit, match="--variants"):
            bench._variants([bad])
    assert bench._curated_label("f0.5") == "curated, floor 0.5"
    assert bench._curated_label("dino_f0.25") == "curated (DINO embeddings), floor 0.25"
    assert bench._curated_label("label") == "curated, label" and not bench._is_floor("fancy")
    with pytest.raises(SystemExit, match="--imbalance"):
        bench._pairs("--imbalance", ["mnist_global=ten"], ["mnist_global"], ratio=True)
    assert bench._pairs("--imbalance", ["mnist_global=2.5"], ["mnist_global"], ratio=True) == {"mnist_global": 2.5}
    for bad in ("mnist_global=1", "mnist_global=0.5", "mnist_global=inf", "mnist_global=nan", "uci=3"):
        with pytest.raises(SystemExit, match="--imbalance"):  # 1 is no tail; below 1 is backwards
            bench._pairs("--imbalance", [bad], ["mnist_global"], ratio=True)
    assert bench._pairs("--epochs", ["mnist_global=16"], ["mnist_global"]) == {"mnist_global": 16}
    with pytest.raises(SystemExit, match="--epochs"):
        bench._pairs("--epochs", ["mnist_global=2.5"], ["mnist_global"])
