"""The pretrain stage end to end on tiny models: artifacts, lineage, errors, exact resume after a kill."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from fmtransfer.errors import ConfigError, DataError
from fmtransfer.lineage import load_record, sha256_file, verify_record
from fmtransfer.models import load_model
from fmtransfer.tasks.pretrain import pretrain
from tests.conftest import ROOT, cli_env
from tests.fixtures import make_image_folder, make_npz

SMOKE = ["experiment=smoke"]


def test_pretrain_writes_artifacts_and_lineage(cfg_factory, tmp_path):
    result = pretrain(cfg_factory("pretrain", *SMOKE, "data=uci_digits_region"))
    out = tmp_path / "pretrain"
    for name in ("model.safetensors", "model.json", "metrics.json", "run.json", "confusion_test.png",
                 "predictions_test.csv", "checkpoints/last.ckpt", "data/uci_digits_region.splits.csv",
                 "logs/metrics.csv"):
        assert (out / name).is_file(), name
    record = load_record(out)
    assert record["status"] == "ok" and record["stage"] == "pretrain"
    assert record["data"][0]["recipe"] == "uci_digits_region" and len(record["data"][0]["fingerprint"]) == 64
    outputs = {o["role"]: o for o in record["outputs"]}
    assert outputs["weights"]["sha256"] == sha256_file(out / "model.safetensors")
    assert verify_record(out) == []
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["overall"]["n"] == result.metrics["test"]["overall"]["n"] > 0
    assert 0.0 <= metrics["test"]["overall"]["accuracy"] <= 1.0
    assert np.array(metrics["test"]["overall"]["confusion_matrix"]).sum() == metrics["test"]["overall"]["n"]
    model, meta = load_model(out)
    assert meta["lineage"]["run_id"] == record["run_id"]
    assert meta["preprocess"]["image_size"] == [28, 28]


def test_pretrain_on_image_folder(cfg_factory, tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=20, channels=3, suffix=".jpg")
    result = pretrain(cfg_factory("pretrain", *SMOKE, "data=image_folder", f"data.source.root={root}",
                                  "data.image_size=[16,16]", "data.limit=null"))
    assert result.metrics["test"]["overall"]["n"] == 9
    assert load_model(result.run_dir)[1]["classes"] == ["a", "b", "c"]


def test_regression_task(cfg_factory, tmp_path):
    path = make_npz(tmp_path / "yield.npz", n=80, channels=4, regression=True)
    result = pretrain(cfg_factory("pretrain", *SMOKE, "data=npz", f"data.source.path={path}", "data.channels=4",
                                  "data.image_size=[16,16]", "data.task=regression", "data.classes=null",
                                  "method=regression", "data.limit=null"))
    test = result.metrics["test"]["overall"]
    assert set(test) >= {"r2", "mae", "rmse"} and test["mae"] >= 0


@pytest.mark.parametrize("overrides,error,message", [
    (["backbone.in_chans=3"], ConfigError, r"backbone.in_chans=3 does not fit .*data.channels=1"),
    (["data=npz", "data.source.path=/x.npz", "data.task=regression", "data.classes=null", "data.channels=1"],
     ConfigError, "use method=regression"),
    (["data=image_folder", "data.source.root=/no/such/folder", "data.channels=1"], DataError, "does not exist"),
], ids=["channels", "task", "missing_data"])
def test_config_errors_before_training(cfg_factory, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        pretrain(cfg_factory("pretrain", *SMOKE, *overrides))
    assert not (tmp_path / "pretrain" / "checkpoints").exists()


@pytest.mark.e2e
def test_killed_run_resumes_to_the_same_result(cfg_factory, tmp_path):
    """A run SIGKILLed mid-epoch, resumed from its run dir, ends exactly where an uninterrupted run ends."""
    args = [*SMOKE, "data=uci_digits_region", "trainer.max_epochs=3", "trainer.limit_train_batches=5"]
    full = pretrain(cfg_factory("pretrain", *args, run_dir=tmp_path / "full"))

    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-m", "fmtransfer.pretrain", *args, f"hydra.run.dir={killed}",
                           "+callbacks.kill._target_=tests.helpers.KillAt", "+callbacks.kill.epoch=1",
                           "+callbacks.kill.batch=3"], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (killed / "checkpoints" / "last.ckpt").is_file() and not (killed / "model.json").exists()
    assert load_record(killed)["status"] == "running"  # the record tells the truth about a killed run

    resumed = pretrain(cfg_factory("pretrain", *args, f"resume={killed}", run_dir=tmp_path / "resumed"))
    assert resumed.metrics["epochs"] == full.metrics["epochs"] == 3
    assert resumed.metrics["global_step"] == full.metrics["global_step"]
    assert resumed.metrics["test"]["overall"] == full.metrics["test"]["overall"]
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    record = load_record(tmp_path / "resumed")
    assert record["parents"][0]["run_dir"] == str(killed.resolve())


def test_resume_errors(cfg_factory, tmp_path):
    from fmtransfer.errors import ArtifactError

    with pytest.raises(ArtifactError, match="no checkpoints/last.ckpt"):
        pretrain(cfg_factory("pretrain", *SMOKE, f"resume={tmp_path}"))
    with pytest.raises(ArtifactError, match="no such checkpoint"):
        pretrain(cfg_factory("pretrain", *SMOKE, f"resume={tmp_path}/nope.ckpt"))
