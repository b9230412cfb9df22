"""The do-no-harm check end to end on a tiny base: adapt records whether its adapter beats the base on the
calibration set; export and pipeline refuse one that does not unless force=true."""

from __future__ import annotations

import json
import logging

import pytest

from fmtransfer.adapters.artifact import read_adapter, save_adapter
from fmtransfer.adapters.harm import DoNoHarmRefused
from fmtransfer.errors import ConfigError
from fmtransfer.export.runtime import OnnxModel
from fmtransfer.lineage import load_record
from fmtransfer.tasks.adapt import adapt
from fmtransfer.tasks.export import export
from fmtransfer.tasks.pipeline import pipeline
from tests.conftest import make_cfg

REGION = ["data=uci_digits_region", "data.limit=300"]
FAST = ["export.latency.repeats=2", "export.latency.warmup=1", "export.calibration.size=64",
        "export.gates.min_int8_agreement=0", "export.gates.max_accuracy_drop=1"]
# a linear probe (frozen norms) over the base's own head with a learning rate of ~0: its predictions are the base's,
# so on every held-out sample the difference is exactly 0: never a gain
NO_GAIN = ["adapter=linear_probe", "adapter.optimizer.lr=1e-12", "adapter.steps=6", "calibration.size=30",
           "logger=none"]


@pytest.fixture(scope="module")
def no_gain(base, tmp_path_factory):
    return adapt(make_cfg("adapt", [f"base={base}", *REGION, *NO_GAIN], tmp_path_factory.mktemp("harm") / "adapt"))


@pytest.mark.slow
def test_adapt_records_an_adapter_that_does_not_beat_its_base(no_gain):
    m = no_gain.metrics["do_no_harm"]
    assert m["checked"] and m["folds"] == 3 and m["n"] == 30 and m["comparator"].startswith("the zero-shot base")
    assert m["difference"] == 0 and m["interval"] == [0, 0] and m["verdict"] == "inconclusive"
    assert m["beats_base"] is False
    header, _ = read_adapter(no_gain.outputs["adapter"])
    assert header["do_no_harm"] == m
    rows = no_gain.outputs["do_no_harm_folds"].read_text().splitlines()
    assert rows[0] == "id,fold,target,adapter_score,base_score" and len(rows) == 31
    assert load_record(no_gain.run_dir)["status"] == "ok"


@pytest.mark.slow
def test_export_refuses_it_unless_forced(no_gain, tmp_path, caplog):
    adapter = no_gain.outputs["adapter"]
    with pytest.raises(DoNoHarmRefused) as e:
        export(make_cfg("export", [f"adapter_file={adapter}", *REGION, *FAST], tmp_path / "refused"))
    message = str(e.value)
    assert str(adapter) in message and "difference +0.0000" in message and "force=true" in message
    assert "inconclusive" in message and "\n" not in message
    assert load_record(tmp_path / "refused")["status"] == "failed"
    assert not (tmp_path / "refused" / "model.onnx").exists()

    with caplog.at_level(logging.WARNING):
        result = export(make_cfg("export", [f"adapter_file={adapter}", *REGION, *FAST, "force=true"],
                                 tmp_path / "forced"))
    assert "released anyway (force=true)" in caplog.text
    harm = result.metrics["do_no_harm"]
    assert harm["forced"] is True and harm["beats_base"] is False
    assert OnnxModel.load(result.outputs["model"]).meta["do_no_harm"]["forced"] is True
    assert load_record(tmp_path / "forced")["do_no_harm"]["forced"] is True
    assert "released with force=true" in (tmp_path / "forced" / "export.md").read_text()


@pytest.mark.slow
def test_merging_does_not_bypass_the_check(no_gain, tmp_path):
    """merge, then export model=<merged>: the adapter's verdict travels in model.json and is refused the same way."""
    from fmtransfer.tasks.merge import merge

    merged = merge(make_cfg("merge", [f"adapter_file={no_gain.outputs['adapter']}"], tmp_path / "merged"))
    with pytest.raises(DoNoHarmRefused, match=r"does not beat its base.*inconclusive.*force=true"):
        export(make_cfg("export", [f"model={merged.outputs['model']}", *REGION, *FAST], tmp_path / "refused"))
    result = export(make_cfg("export", [f"model={merged.outputs['model']}", *REGION, *FAST, "force=true"],
                             tmp_path / "forced"))
    assert result.metrics["do_no_harm"]["forced"] is True


@pytest.mark.slow
def test_an_adapter_without_the_check_is_refused_as_unchecked(no_gain, tmp_path):
    header, state = read_adapter(no_gain.outputs["adapter"])
    old = tmp_path / "old" / "adapter.safetensors"
    old.parent.mkdir()
    save_adapter(old, state, {k: v for k, v in header.items() if k not in ("do_no_harm", "path")})
    with pytest.raises(DoNoHarmRefused, match=r"was not checked against its base: not checked \(the adapter was "
                                              r"written before"):
        export(make_cfg("export", [f"adapter_file={old}", *REGION, *FAST], tmp_path / "run"))


@pytest.mark.slow
def test_an_adapter_that_beats_its_base_is_exported(base, tmp_path):
    result = adapt(make_cfg("adapt", [f"base={base}", *REGION, "adapter.steps=40", "calibration.size=60",
                                      "logger=none"], tmp_path / "adapt"))
    m = result.metrics["do_no_harm"]
    assert m["verdict"] == "better" and m["beats_base"] is True and m["interval"][0] > 0
    exported = export(make_cfg("export", [f"adapter_file={result.outputs['adapter']}", *REGION, *FAST],
                               tmp_path / "export"))
    assert exported.metrics["do_no_harm"]["forced"] is False
    assert OnnxModel.load(exported.outputs["model"]).meta["do_no_harm"]["beats_base"] is True


@pytest.mark.slow
def test_folds_zero_and_a_tiny_calibration_set_leave_it_unchecked(base, cfg_factory, caplog):
    with caplog.at_level(logging.WARNING):
        off = adapt(cfg_factory("adapt", f"base={base}", *REGION, "adapter.steps=2", "calibration.size=20",
                                "logger=none", "do_no_harm.folds=0", run_dir=None))
    assert off.metrics["do_no_harm"] == {"checked": False, "verdict": "unchecked", "beats_base": None,
                                         "reason": "do_no_harm.folds=0"}
    assert "NOT checked against its base" in caplog.text
    # 10 samples of 10 classes: one a class, no two folds can each hold every class
    tiny = adapt(make_cfg("adapt", [f"base={base}", *REGION, "adapter.steps=2", "calibration.size=10",
                                    "logger=none"], off.run_dir.parent / "tiny"))
    assert tiny.metrics["do_no_harm"]["verdict"] == "unchecked"
    assert "too small for 2 cross-validation folds" in tiny.metrics["do_no_harm"]["reason"]
    header, _ = read_adapter(tiny.outputs["adapter"])
    assert header["do_no_harm"]["beats_base"] is None


def test_bad_do_no_harm_settings_are_refused(cfg_factory, tmp_path):
    for value, match in (("do_no_harm.folds=1", "expected 0 .no check. or 2 or more"),
                         ("do_no_harm.confidence=1.5", r"do_no_harm.confidence=1.5"),
                         ("do_no_harm.resamples=10", "do_no_harm.resamples=10")):
        with pytest.raises(ConfigError, match=match):
            adapt(cfg_factory("adapt", "base=/nonexistent", *REGION, value))  # refused before the base is read
    assert not (tmp_path / "adapt").exists()


@pytest.mark.slow
def test_pipeline_reports_an_adapter_that_does_not_beat_its_base_then_fails(cfg_factory, tmp_path):
    with pytest.raises(DoNoHarmRefused, match="does not beat its base"):
        pipeline(cfg_factory("pipeline", "experiment=smoke", "region.limit=200", "sweep.sizes=[20]",
                             "sweep.adapters=[lora]", "calibration.size=20", 'adapt_overrides=["adapter.steps=2"]',
                             "curate_global=false", "export.quantize=none", "export.latency.repeats=1"))
    out = tmp_path / "pipeline"
    report = (out / "report.md").read_text()
    assert "## Do no harm" in report and "**Not exported**: adapter" in report
    assert "edge export: refused" in report and not (out / "export" / "model.onnx").exists()
    assert load_record(out)["status"] != "ok"
    assert json.loads((out / "adapt" / "0_lora_n20" / "metrics.json").read_text())["do_no_harm"]["checked"]
