"""adapt base=null: an adapter straight over foundation weights a user brings, without a pretrain run."""

from __future__ import annotations

import pytest

from fmtransfer.adapters import read_adapter
from fmtransfer.errors import ConfigError
from fmtransfer.lineage import load_record, verify_record
from fmtransfer.models import load_model
from fmtransfer.tasks.adapt import adapt
from fmtransfer.tasks.evaluate import evaluate
from tests.tasks.test_foundation import dino_checkpoint

REGION = ["data=uci_digits_region", "data.limit=300", "logger=none", "adapter.steps=6", "calibration.size=30"]


@pytest.mark.slow
def test_adapt_over_a_brought_checkpoint_saves_the_base_in_the_run(cfg_factory, tmp_path):
    path, _ = dino_checkpoint(tmp_path / "dino.pth", "test_vit")
    result = adapt(cfg_factory("adapt", "base=null", "backbone=tiny_vit", f"backbone.checkpoint={path}", *REGION))
    out, m = result.run_dir, result.metrics
    base, meta = load_model(out / "base")  # sealed model.json + model.safetensors, head-less
    assert meta["num_outputs"] == 0 and meta["task"] == "embedding"
    assert meta["backbone_weights"]["source"] == "checkpoint" and meta["backbone_weights"]["location"] == str(path)
    assert meta["backbone_weights"]["adapted"]["in_chans"] == "3 -> 1 (summed)"
    header, _ = read_adapter(out / "adapter.safetensors")
    assert header["base"]["path"] == str((out / "base" / "model.json").resolve())
    assert header["base"]["sha256"] == meta["weights_sha256"] and m["zero_shot"] is None
    assert m["base_bytes"] == (out / "base" / "model.safetensors").stat().st_size > m["adapter_bytes"]

    # the adapter file alone finds its base in the run and reproduces the stage's score
    ev = evaluate(cfg_factory("evaluate", f"adapter_file={out / 'adapter.safetensors'}", *REGION[:2],
                              run_dir=tmp_path / "ev"))
    assert ev.metrics["overall"]["accuracy"] == m["test"]["overall"]["accuracy"]
    record = load_record(out)
    assert {i["role"] for i in record["inputs"]} >= {"base", "backbone_checkpoint"}
    assert {o["role"] for o in record["outputs"]} >= {"base_model", "base_weights", "adapter"}
    assert not record["parents"] and verify_record(out) == []


def test_base_null_needs_brought_weights(cfg_factory, tmp_path):
    with pytest.raises(ConfigError, match="base=null adapts over foundation weights you bring: pass backbone="):
        adapt(cfg_factory("adapt", "base=null", *REGION))
    with pytest.raises(ConfigError, match="base=null with backbone=test_vit names no weights"):
        adapt(cfg_factory("adapt", "base=null", "backbone=tiny_vit", *REGION))
    assert not (tmp_path / "adapt" / "base").exists()
