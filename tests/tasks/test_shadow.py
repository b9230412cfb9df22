"""``shadow`` end to end on the tiny base: against its own ONNX export and against itself; bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fmtransfer.errors import DataError
from fmtransfer.tasks.evaluate import evaluate
from fmtransfer.tasks.shadow import INCONCLUSIVE, KEEP, shadow
from tests.conftest import make_cfg
from tests.fixtures import pattern, save_image

pytestmark = pytest.mark.slow

DATA = ["data=mnist_global", "data.limit=300"]
FAST = [*DATA, "latency.repeats=2", "latency.warmup=0", "latency.batch_size=8", "resamples=2000",
        "accelerator=cpu"]


def test_shadow_of_a_model_and_its_export(base, onnx_model, tmp_path):
    run = tmp_path / "shadow"
    result = shadow(make_cfg("shadow", [f"production={base}", f"candidate={onnx_model}", *FAST], run))
    report = json.loads((run / "shadow.json").read_text())
    s = report["stats"]
    assert s["n"] == 30  # the test split of 300 rows
    scored = evaluate(make_cfg("evaluate", [f"model={base}", *DATA, "split=test"], tmp_path / "eval"))
    assert s["production_accuracy"] == pytest.approx(scored.metrics["overall"]["accuracy"])
    assert s["agreement"] == 1.0 and s["disagreements"] == 0  # fp32 ONNX decides as PyTorch does
    assert s["gain_interval"] == [0.0, 0.0]
    assert report["recommendation"] == KEEP and "not more accurate" in report["reasons"][0]
    assert report["production"]["kind"] == "torch" and report["candidate"]["kind"] == "onnx"
    for role in ("production", "candidate"):
        assert report["latency"][role]["ms_per_sample"] > 0 and report["latency"][role]["batch_size"] == 8
    with open(run / "disagreements.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []
    assert "Recommendation: keep production" in (run / "shadow.md").read_text()
    assert result.metrics["recommendation"] == KEEP and result.outputs["disagreements"] == run / "disagreements.csv"


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another tiny model (another seed): it disagrees with ``base`` on some rows."""
    from fmtransfer.tasks.pretrain import pretrain

    folder = tmp_path_factory.mktemp("other")
    return pretrain(make_cfg("pretrain", ["experiment=smoke", "seed=7"], folder / "run")).run_dir


def test_shadow_lists_disagreements_and_counts_them(base, other, tmp_path):
    run = tmp_path / "shadow"
    shadow(make_cfg("shadow", [f"production={base}", f"candidate={other}", *FAST, "split=all"], run))
    report = json.loads((run / "shadow.json").read_text())
    s = report["stats"]
    with open(run / "disagreements.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert s["n"] == 300 and s["disagreements"] > 0 and len(rows) == s["disagreements"]
    assert s["agreement"] == pytest.approx(1 - len(rows) / 300)
    assert all(r["production"] != r["candidate"] and r["label"] and r["id"].startswith("mnist:") for r in rows)
    right = sum(r["candidate"] == r["label"] for r in rows) - sum(r["production"] == r["label"] for r in rows)
    assert s["gain"] == pytest.approx(right / 300)  # the gain comes only from the rows where they disagree
    lo, hi = s["gain_interval"]
    assert lo <= s["gain"] <= hi and report["recommendation"] in ("promote", "keep production", "inconclusive")


def test_shadow_refuses_an_empty_split(base, onnx_model, tmp_path):
    with pytest.raises(DataError, match="no samples in split 'test'"):
        shadow(make_cfg("shadow", [f"production={base}", f"candidate={onnx_model}", *FAST, "data.split.train=0.9",
                                   "data.split.val=0.1", "data.split.test=0.0"], tmp_path / "empty"))


def test_shadow_without_labels_decides_on_agreement_alone(base, other, tmp_path):
    """New images with no labels at all (a flat folder): no accuracy, the verdict rests on agreement, and the
    disagreements are listed to be labelled."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "new_images"
    for i in range(40):
        save_image(pattern(i % 10, 28, rng), folder / f"img_{i:03d}.png")
    run = tmp_path / "shadow"
    result = shadow(make_cfg("shadow", [f"production={base}", f"candidate={other}", "data=image_folder",
                                        f"data.source.root={folder}", "data.channels=1", "data.image_size=[28,28]",
                                        "split=all", *FAST[len(DATA):]], run))
    report = json.loads((run / "shadow.json").read_text())
    s = report["stats"]
    assert s["n"] == 40 and "gain" not in s and "production_accuracy" not in s
    assert report["recommendation"] == INCONCLUSIVE  # 40 inputs cannot show 99% agreement, however they agree
    assert any("no labels" in r for r in report["reasons"])
    with open(run / "disagreements.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == s["disagreements"] and all(r["label"] == "" for r in rows)
    assert result.metrics["recommendation"] == INCONCLUSIVE
