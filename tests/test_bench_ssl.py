"""scripts/bench_ssl.py's plain PyTorch DINO loop does the work the ``pretrain method=dino`` stage does, so the
throughput ratio compares the same computation."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fmtransfer.config import compose_stage

pytestmark = pytest.mark.slow  # two short DINO runs

ROOT = Path(__file__).resolve().parents[1]


def _bench_ssl(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_ssl", ROOT / "scripts" / "bench_ssl.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_ssl", module)  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


def test_plain_dino_loop_matches_the_stage(tmp_path, monkeypatch):
    """Same seed, weights, data order and crops: every epoch's mean loss agrees (the centre, the EMA teacher, the
    frozen prototypes of epoch 1, the schedules and the clipping all feed epoch 2's)."""
    bench = _bench_ssl(monkeypatch)
    cfg = compose_stage("pretrain", ["method=dino", "data=mnist_global", "data.limit=200", "backbone=tiny_cnn",
                                     "trainer.max_epochs=2", "trainer.limit_train_batches=2", "loader.batch_size=16",
                                     "method.dino.knn.max_bank=64", "logger=none", "trainer.enable_progress_bar=false",
                                     f"run_dir={tmp_path / 'run'}"])
    _, framework = bench.framework_rate(cfg)
    _, plain = bench.plain_rate(cfg, 2, 2)
    assert len(framework) == len(plain) == 2
    assert plain == pytest.approx(framework, rel=1e-5, abs=1e-6)


def test_the_features_section_takes_another_recipe_and_a_given_supervised_model(tmp_path, monkeypatch):
    """docs/ssl.md's Fashion-MNIST table: every model trained and scored on --data with its overrides; a supervised
    model given by path is scored, not trained."""
    bench = _bench_ssl(monkeypatch)
    args = bench.parse_args(["--sections", "features", "--archs", "resnet18", "--seeds", "0", "--data",
                             "fashion_mnist", "--data-override", "data.limit=12000", "--supervised-model",
                             str(tmp_path / "sup"), "--out", str(tmp_path / "out")])
    runs = bench.model_runs(bench.Bench(args))
    assert runs["supervised"]["resnet18"] == [{"seed": None, "overrides": None, "run": tmp_path / "sup"}]
    for kind in ("random init", "DINO"):
        overrides = runs[kind]["resnet18"][0]["overrides"]
        assert "data=fashion_mnist" in overrides and "data.limit=12000" in overrides, kind
    assert bench.feature_data(bench.parse_args([])) == ["data=mnist_global"]
