"""evaluate: any recipe and split, per-region metrics, confusion PNG, and clear refusals."""

from __future__ import annotations

import csv
import json

import pytest

from fmtransfer.errors import ArtifactError, ConfigError, DataError
from fmtransfer.lineage import load_record, verify_record
from fmtransfer.tasks.evaluate import evaluate
from fmtransfer.tasks.pretrain import pretrain
from tests.fixtures import make_csv_manifest, make_image_folder

SMOKE = ["experiment=smoke", "data.limit=null", "data.image_size=[16,16]"]


@pytest.fixture(scope="module")
def csv_model(tmp_path_factory):
    """A tiny model trained on a 3-channel CSV manifest with two regions."""
    from tests.conftest import make_cfg

    root = tmp_path_factory.mktemp("csvdata")
    manifest = make_csv_manifest(root, per_class=10)
    cfg = make_cfg("pretrain", [*SMOKE, "data=csv_manifest", f"data.source.path={manifest}"], root / "run")
    return pretrain(cfg), manifest


def test_per_region_metrics_and_confusion(csv_model, cfg_factory, tmp_path):
    result, manifest = csv_model
    ev = evaluate(cfg_factory("evaluate", f"model={result.run_dir}", "data=csv_manifest",
                              f"data.source.path={manifest}", "split=test", "data.image_size=[16,16]"))
    m = ev.metrics
    assert set(m["regions"]) == {"north", "south"}
    assert m["overall"]["n"] == sum(r["n"] for r in m["regions"].values())
    # scoring the same split the pretrain stage scored gives the same numbers
    assert m["overall"]["accuracy"] == result.metrics["test"]["overall"]["accuracy"]
    out = tmp_path / "evaluate"
    assert (out / "confusion_test.png").stat().st_size > 1000
    with open(out / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == m["overall"]["n"] and {"id", "region", "label", "prediction", "confidence"} <= set(rows[0])
    record = load_record(out)
    assert record["parents"][0]["run_dir"] == str(result.run_dir) or record["parents"][0]["stage"] == "pretrain"
    assert verify_record(out) == []
    assert json.loads((out / "metrics.json").read_text())["split"] == "test"


def test_evaluate_on_another_recipe_converts_channels(csv_model, cfg_factory, tmp_path):
    """A grey ImageFolder scored by an RGB model: images are converted to the model's channels."""
    result, _ = csv_model
    root = make_image_folder(tmp_path / "grey", per_class=6, channels=1)
    ev = evaluate(cfg_factory("evaluate", f"model={result.run_dir}/model.safetensors", "data=image_folder",
                              f"data.source.root={root}", "data.channels=1", "split=train"))
    assert ev.metrics["overall"]["n"] > 0


def test_refuses_a_class_the_model_never_had(csv_model, cfg_factory, tmp_path):
    result, _ = csv_model
    root = make_image_folder(tmp_path / "other", classes=("a", "zebra"), per_class=6, channels=3)
    with pytest.raises(DataError, match="'zebra'"):
        evaluate(cfg_factory("evaluate", f"model={result.run_dir}", "data=image_folder",
                             f"data.source.root={root}"))


def test_refuses_a_task_the_model_was_not_trained_for(csv_model, cfg_factory):
    result, manifest = csv_model
    with pytest.raises(ConfigError, match="regression"):
        evaluate(cfg_factory("evaluate", f"model={result.run_dir}", "data=csv_manifest",
                             f"data.source.path={manifest}", "data.task=regression"))


def test_refuses_a_folder_without_a_model(cfg_factory, tmp_path):
    with pytest.raises(ArtifactError, match="holds no model"):
        evaluate(cfg_factory("evaluate", f"model={tmp_path}"))


def test_lightning_checkpoint_can_be_scored(csv_model, cfg_factory):
    result, manifest = csv_model
    ckpt = f"{result.run_dir}/checkpoints/last.ckpt"
    ev = evaluate(cfg_factory("evaluate", f"model={ckpt}", "data=csv_manifest", f"data.source.path={manifest}",
                              "data.image_size=[16,16]"))
    assert ev.metrics["overall"]["accuracy"] == result.metrics["test"]["overall"]["accuracy"]
