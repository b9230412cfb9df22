"""monitor end to end: verdicts, the accuracy estimate, OOD manifest, reuse of reference statistics, windows over an
order column, and the refusals."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from fmtransfer.errors import ArtifactError, ConfigError, DataError
from fmtransfer.lineage import load_record, verify_record
from fmtransfer.tasks.model_outputs import ModelOutputs
from fmtransfer.tasks.monitor import _check_outputs, monitor
from tests.fixtures import make_image_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A copy of a tiny trained base (tiny_cnn on mnist_global): monitor stores reference statistics beside it."""
    from tests.conftest import _pretrained

    run = _pretrained(tmp_path_factory, "monitored", [])
    copy = tmp_path_factory.mktemp("model") / "run"
    shutil.copytree(run, copy)
    return copy


def _run(cfg_factory, tmp_path, name, *overrides):
    return monitor(cfg_factory("monitor", *overrides, "monitor.permutations=99", run_dir=tmp_path / name))


def test_region_drift_estimate_ood_and_reuse(model, cfg_factory, tmp_path):
    result = _run(cfg_factory, tmp_path, "first", f"model={model}", "reference=mnist_global/val",
                  "current=uci_digits_region/test")
    m = result.metrics
    assert m["reference"]["statistics"] == "computed"
    assert (model / "monitoring").is_dir()  # stored beside the model, keyed by its sha256
    assert {t for t, v in m["tests"].items() if v["detected"]} >= {"bbsd", "domain_classifier"}
    assert m["summary"].startswith("drift detected by")
    for v in m["tests"].values():
        assert v["skipped"] is None and 0 < v["p_value"] <= 1 and v["n_current"] == m["current"]["n"]
    acc = m["accuracy"]
    assert acc["true"] is not None and 0 < acc["estimated"] <= 1 and acc["temperature"] > 0
    assert abs(acc["error"] - (acc["estimated"] - acc["true"])) < 1e-9
    assert m["ood"]["share"] > 0.05  # another scanner: more than the reference's own 5% lie beyond its quantile
    with open(result.outputs["manifest"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == m["ood"]["manifest_n"] and list(rows[0]) == ["id", "path", "label", "region", "ood_score"]
    scores = [float(r["ood_score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and rows[0]["id"].startswith("uci_digits:")
    md = (result.run_dir / "monitor.md").read_text()
    assert "drift detected by" in md and "Estimated accuracy" in md and "label_first.csv" in md
    assert (result.run_dir / "ood_scores.png").stat().st_size > 1000
    assert verify_record(result.run_dir) == []
    assert {d["role"]: d["recipe"] for d in load_record(result.run_dir)["data"]} == {
        "reference": "mnist_global", "current": "uci_digits_region"}
    # the same model and reference again: statistics reused; the stored file as reference= works too
    again = _run(cfg_factory, tmp_path, "again", f"model={model}", "current=mnist_global/test")
    assert again.metrics["reference"]["statistics"] == "reused"
    # the same distribution looks less drifted than the region (the smoke model barely trained: no stronger claim)
    assert again.metrics["tests"]["bbsd"]["p_value"] > m["tests"]["bbsd"]["p_value"]
    stored = again.metrics["reference"]["file"]
    loaded = _run(cfg_factory, tmp_path, "loaded", f"model={model}", f"reference={stored}",
                  "current=mnist_global/test")
    assert loaded.metrics["reference"]["statistics"] == "loaded"
    assert loaded.metrics["tests"]["bbsd"]["p_value"] == pytest.approx(again.metrics["tests"]["bbsd"]["p_value"])


def test_windows_over_a_csv_order_column(model, cfg_factory, tmp_path):
    root = make_image_folder(tmp_path / "imgs", classes=("0", "1"), per_class=30, size=28)
    files = sorted(root.rglob("*.png"))
    csv_path = root / "stream.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "t"])
        for i, p in enumerate(files):
            w.writerow([str(p.relative_to(root)), f"2026-11-{1 + i // 20:02d}T{i % 20:02d}:00:00"])
    result = _run(cfg_factory, tmp_path, "win", f"model={model}", f"current={csv_path}", "monitor.window.order=t",
                  "monitor.window.size=20", f"reference_cache={tmp_path / 'cache'}")
    win = result.metrics["windows"]
    assert [w["n"] for w in win] == [20, 20, 20] and win[0]["first"] < win[1]["first"] < win[2]["first"]
    assert set(win[0]["tests"]) == {"bbsd", "mmd", "domain_classifier", "label_shift"}
    assert "estimated_accuracy" in win[0] and "accuracy" not in win[0]  # the CSV has no labels
    assert (result.run_dir / "windows.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="no such column"):
        _run(cfg_factory, tmp_path, "nocol", f"model={model}", f"current={csv_path}", "monitor.window.order=when",
             f"reference_cache={tmp_path / 'cache'}")


def test_refusals(model, cfg_factory, tmp_path):
    cache = f"reference_cache={tmp_path / 'cache'}"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        _run(cfg_factory, tmp_path, "empty", f"model={model}", f"current={empty}", cache)
    with pytest.raises(DataError, match="at least"):
        _run(cfg_factory, tmp_path, "few", f"model={model}", "current_limit=3", cache)
    first = _run(cfg_factory, tmp_path, "ref", f"model={model}", "current=mnist_global/test", cache)
    # statistics of another model (its sha256 in the header) given as this model's reference
    stats = json.loads(open(first.metrics["reference"]["file"]).read())
    stats["model"]["sha256"] = "0" * 64
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({**stats, "arrays": str(first.metrics["reference"]["file"]).replace(".json", ".npz")}))
    with pytest.raises(ArtifactError, match="compare a model only with its own reference"):
        _run(cfg_factory, tmp_path, "other", f"model={model}", f"reference={forged}", cache)
    with pytest.raises(ConfigError, match="no data recipe 'nope'"):
        _run(cfg_factory, tmp_path, "nope", f"model={model}", "current=nope/test", cache)
    nan = ModelOutputs(np.full((4, 3), np.nan), None, None, None, np.arange(4), 0.0)
    with pytest.raises(DataError, match="NaN"):
        _check_outputs(nan, "current=x")


def test_onnx_without_an_embedding_output(cfg_factory, tmp_path):
    """BBSD and label shift run; MMD, the domain classifier and OOD are skipped, saying why; asking for embedding
    tests only is an error."""
    from tests.monitoring.test_model_outputs import _export, _model

    model, meta = _model(tmp_path / "run")
    onnx = _export(model, meta, tmp_path / "only.onnx", ["logits"])
    ref = make_image_folder(tmp_path / "ref", classes=("0", "1", "2"), per_class=20, size=16, seed=1)
    cur = make_image_folder(tmp_path / "cur", classes=("0", "1", "2"), per_class=10, size=16, seed=2)
    result = _run(cfg_factory, tmp_path, "onnx", f"model={onnx}", f"reference={ref}", f"current={cur}")
    tests = result.metrics["tests"]
    assert tests["bbsd"]["skipped"] is None and tests["label_shift"]["skipped"] is None
    assert "no embeddings" in tests["mmd"]["skipped"] and "no embeddings" in tests["domain_classifier"]["skipped"]
    assert "skipped" in result.metrics["ood"] and "manifest" not in result.outputs
    assert "| mmd | skipped |" in (result.run_dir / "monitor.md").read_text()
    with pytest.raises(ConfigError, match="needs embeddings"):
        _run(cfg_factory, tmp_path, "onnx2", f"model={onnx}", f"reference={ref}", f"current={cur}",
             "monitor.tests=[mmd]")
