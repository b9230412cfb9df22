"""The ``predict`` stage: where its CSV goes."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from fmtransfer.lineage import load_record
from fmtransfer.tasks.predict import predict
from tests.conftest import make_cfg
from tests.fixtures import pattern, save_image

DATA = ["data=mnist_global", "data.limit=300"]


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        save_image(pattern(i, 28, rng), tmp_path / "images" / f"{i}.png")
    return tmp_path / "images"


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_relative_output_goes_into_the_run_dir(onnx_model, images, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run = tmp_path / "run"
    result = predict(make_cfg("predict", [f"model={onnx_model}", f"input={images}"], run))  # output: predictions.csv
    assert result.outputs["output"] == run / "predictions.csv" and len(_rows(run / "predictions.csv")) == 3
    nested = predict(make_cfg("predict", [f"model={onnx_model}", f"input={images}", "output=preds/region.csv"],
                              tmp_path / "run2"))
    assert nested.outputs["output"] == tmp_path / "run2" / "preds" / "region.csv"
    assert list(cwd.iterdir()) == []  # nothing in the working directory
    outputs = {o["role"]: o["path"] for o in load_record(run)["outputs"]}
    assert outputs["predictions"] == "predictions.csv"  # recorded inside the run dir


def test_absolute_output_is_honoured(onnx_model, images, tmp_path):
    target = tmp_path / "elsewhere" / "p.csv"
    result = predict(make_cfg("predict", [f"model={onnx_model}", f"input={images}", f"output={target}"],
                              tmp_path / "run"))
    assert result.outputs["output"] == target and len(_rows(target)) == 3
    assert not (tmp_path / "run" / "p.csv").exists() and not (tmp_path / "run" / "predictions.csv").exists()


def test_monitoring_on_the_device_writes_ood_columns_and_drift_into_metrics(onnx_model, images, tmp_path):
    import json

    from fmtransfer.errors import ConfigError

    run = tmp_path / "run"
    result = predict(make_cfg("predict", [f"model={onnx_model}", f"input={images}", "monitor.enabled=true"], run))
    rows = _rows(run / "predictions.csv")
    assert len(rows) == 3 and all(float(r["ood_score"]) >= 0 and r["ood_flag"] in ("0", "1") for r in rows)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["monitor"]["n"] == 3 and set(metrics["monitor"]["drift"]) == {"bbsd", "mmd", "domain_classifier",
                                                                                  "label_shift"}
    assert all(v["skipped"] for v in metrics["monitor"]["drift"].values())  # 3 images: too few for any test
    inputs = {o["role"]: o["path"] for o in load_record(run)["inputs"]}
    assert inputs["monitoring_reference"].endswith(".json") and result.outputs["metrics"] == run / "metrics.json"
    with pytest.raises(ConfigError, match="scene.enabled=true and monitor.enabled=true"):
        predict(make_cfg("predict", [f"model={onnx_model}", f"input={images}", "monitor.enabled=true",
                                     "scene.enabled=true"], tmp_path / "both"))
    with pytest.raises(ConfigError, match="monitor.enabled='yes'"):
        predict(make_cfg("predict", [f"model={onnx_model}", f"input={images}", "monitor.enabled=yes"],
                         tmp_path / "bad"))
