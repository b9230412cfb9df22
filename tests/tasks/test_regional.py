"""adapt with regional pretraining (``regional_pretrain.*``): DINO on the region's train split before the adapter's
fit, saved in the adapter file, reused by later runs, refused for methods it cannot serve, and the pipeline's with /
without comparison."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

import fmtransfer.tasks.adapt as adapt_module
from fmtransfer.adapters.loading import load_model_or_adapted
from fmtransfer.adapters.methods import norm_modules
from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.lineage import load_record, verify_record
from fmtransfer.models import load_model
from fmtransfer.models.dino import CollapseError
from fmtransfer.tasks.adapt import adapt
from fmtransfer.tasks.pipeline import pipeline
from fmtransfer.tasks.regional import verdict

# 180 train images of the region, 5 DINO steps of 32 in one epoch; a small projection head
REGION = ["data=uci_digits_region", "data.limit=300", "logger=none", "adapter.steps=6", "calibration.size=30"]
REGIONAL = ["regional_pretrain.epochs=1", "regional_pretrain.dino.prototypes=64", "regional_pretrain.dino.hidden_dim=64",
            "regional_pretrain.dino.bottleneck_dim=32", "regional_pretrain.dino.crops.n_local=2"]


class _Spy:
    """Keeps the in-memory adapted model that adapt scores on the test split."""

    def __init__(self, monkeypatch):
        self.model = None
        original = adapt_module.score_model

        def spy(model, meta, recipe, *, split, **kwargs):
            if split == "test":
                self.model = model
            return original(model, meta, recipe, split=split, **kwargs)

        monkeypatch.setattr(adapt_module, "score_model", spy)


def _outputs(model, meta) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(8, meta["preprocess"]["channels"], *meta["preprocess"]["image_size"])
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.slow
def test_regional_pretraining_trains_lora_and_the_last_block_and_reloads_exactly(base, cfg_factory, tmp_path,
                                                                                monkeypatch):
    spy = _Spy(monkeypatch)
    result = adapt(cfg_factory("adapt", f"base={base}", *REGION, *REGIONAL, "regional_pretrain.trainable=last_block"))
    out, m = result.run_dir, result.metrics
    record = m["regional_pretrain"]
    assert record["epochs"] == 1 and record["steps"] == 5 and record["images"] == 180
    assert record["trainable"] == "last_block" and record["seconds"] > 0
    assert set(record["final_signals"]) >= {"loss", "teacher_entropy", "kl", "embedding_std"}
    assert 0 <= record["feature_knn_val"]["before"] <= 1 and 0 <= record["feature_knn_val"]["after"] <= 1
    assert (out / "regional_pretrain.json").is_file() and (out / "regional_pretrain_signals.png").is_file()
    # the same adapter fitted without it, scored beside it (regional_pretrain.compare, on by default)
    comparison = record["comparison"]
    assert comparison["with"] == {"val": m["val"]["overall"]["accuracy"], "test": m["test"]["overall"]["accuracy"]}
    assert comparison["helped"] == (comparison["with"]["val"] >= comparison["without"]["val"])
    assert (out / "without_regional" / "predictions_test.csv").is_file()
    assert not (out / "without_regional" / "checkpoints").exists()

    # DINO moved LoRA from its initial zero B matrices, and the last block away from the base's weights
    pretrained = load_file(str(out / "regional_pretrain.safetensors"))
    lora_b = [v for k, v in pretrained.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)
    _, base_meta = load_model(base)
    base_state = load_file(str(base / base_meta["weights"]))
    # the block's convolutions (under LoRA: base_layer): trained by DINO only, not by the supervised fit
    block = [k for k in pretrained if k.startswith("backbone.layer4.0.") and ".base_layer." in k]
    assert block and any(not torch.equal(pretrained[k], base_state[k.replace(".base_layer", "")]) for k in block)

    # the adapter holds them (frozen in the supervised fit: as regional pretraining left them), and no other weight
    # of the backbone: one small file over the shared base
    adapter = load_file(str(out / "adapter.safetensors"))
    for k in block:
        assert torch.equal(adapter[k], pretrained[k]), k
    base_model, _ = load_model(base)
    allowed = ("backbone.layer4.0.", "head.", *(f"backbone.{n}." for n, _ in norm_modules(base_model.backbone)))
    assert not [k for k in adapter if not (k.startswith(allowed) or "lora_" in k)]
    # test_resnet's last block holds most of its weights: the file is smaller than the base, not small
    assert record["extra_parameters"] > 0 and record["extra_bytes"] < m["adapter_bytes"] < m["base_bytes"]

    # the saved adapter over the base reproduces the in-memory model exactly; its header records the pretraining
    loaded = load_model_or_adapted(adapter=out / "adapter.safetensors")
    assert torch.equal(_outputs(loaded.model, loaded.meta), _outputs(spy.model, loaded.meta))
    assert loaded.adapter["regional_pretrain"]["steps"] == 5
    merged = load_model_or_adapted(adapter=out / "adapter.safetensors", merge=True)
    assert torch.allclose(_outputs(merged.model, merged.meta), _outputs(spy.model, merged.meta), atol=1e-5)
    roles = {o["role"] for o in load_record(out)["outputs"]}
    assert {"regional_pretrain", "regional_pretrain_signals", "regional_pretrain_plot"} <= roles
    assert verify_record(out) == []


@pytest.mark.slow
def test_vpt_on_a_vit_with_local_views_reloads_exactly(vit_base, cfg_factory, monkeypatch):
    """A ViT takes the smaller local views through a dynamic-size copy of its backbone; the adapter still fits the
    base as saved."""
    spy = _Spy(monkeypatch)
    result = adapt(cfg_factory("adapt", f"base={vit_base}", "adapter=vpt", "adapter.method.num_tokens=2", *REGION,
                               *REGIONAL))
    assert result.metrics["regional_pretrain"]["steps"] == 5
    prompts = load_file(str(result.run_dir / "regional_pretrain.safetensors"))
    assert "backbone.prompts" in prompts and any("norm" in k for k in prompts)
    loaded = load_model_or_adapted(adapter=result.outputs["adapter"])
    assert torch.equal(_outputs(loaded.model, loaded.meta), _outputs(spy.model, loaded.meta))


@pytest.mark.slow
def test_a_later_run_reuses_the_pretraining(base, cfg_factory, tmp_path, caplog):
    first = adapt(cfg_factory("adapt", f"base={base}", *REGION, *REGIONAL, run_dir=tmp_path / "first"))
    # trainable=norms: LoRA trains the norms anyway, so the adapter file is as large as without regional pretraining
    assert first.metrics["regional_pretrain"]["extra_parameters"] == 0
    with caplog.at_level(logging.WARNING):
        second = adapt(cfg_factory("adapt", f"base={base}", *REGION, "calibration.size=20",
                                   f"regional_pretrain.reuse={first.run_dir}", run_dir=tmp_path / "second"))
    record = second.metrics["regional_pretrain"]
    assert record["reused_from"] == str((first.run_dir / "regional_pretrain.safetensors").resolve())
    assert record["steps"] == first.metrics["regional_pretrain"]["steps"]
    assert not (second.run_dir / "regional_pretrain.json").exists()  # nothing trained here
    # whichever way the comparison went, the run says it: a warning exactly when it did not help
    assert ("regional pretraining did not help" in caplog.text) == (not record["comparison"]["helped"])
    with pytest.raises(ArtifactError, match="pretrained with another method"):
        adapt(cfg_factory("adapt", f"base={base}", *REGION, "adapter.method.rank=2",
                          f"regional_pretrain.reuse={first.run_dir}", run_dir=tmp_path / "third"))


def test_a_drop_against_the_adapter_without_it_is_a_warning_and_helped_false(caplog):
    with_ = {"val": {"accuracy": 0.80}, "test": {"accuracy": 0.82}}
    without = {"val": {"accuracy": 0.85}, "test": {"accuracy": 0.81}}
    with caplog.at_level(logging.WARNING):
        worse = verdict("classification", with_, without)
    assert worse["helped"] is False and worse["decided_on"] == "val"
    assert worse["with"] == {"val": 0.80, "test": 0.82} and worse["without"] == {"val": 0.85, "test": 0.81}
    assert "regional pretraining did not help: the adapter's val accuracy is 0.8000 with it and 0.8500 without" in \
        caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert verdict("classification", without, with_)["helped"] is True
    assert not caplog.text
    # no val split: test decides; regression compares R^2
    assert verdict("regression", {"val": None, "test": {"r2": 0.5}}, {"val": None, "test": {"r2": 0.6}}) == {
        "metric": "r2", "decided_on": "test", "helped": False, "with": {"val": None, "test": 0.5},
        "without": {"val": None, "test": 0.6}}


def test_methods_it_cannot_serve_and_bad_settings_are_refused(base, cfg_factory, tmp_path):
    for method in ("linear_probe", "bitfit", "full"):
        with pytest.raises(ConfigError, match=rf"regional_pretrain.epochs=1 needs .*adapter=lora or adapter=vpt, not "
                                              rf"adapter={method}"):
            adapt(cfg_factory("adapt", f"base={base}", *REGION, f"adapter={method}", "regional_pretrain.epochs=1"))
    with pytest.raises(ConfigError, match="regional_pretrain.trainable='all'"):
        adapt(cfg_factory("adapt", f"base={base}", *REGION, "regional_pretrain.epochs=1",
                          "regional_pretrain.trainable=all"))
    with pytest.raises(ConfigError, match=r"loader.batch_size=8 is too small .*regional_pretrain.dino.min_batch_size"):
        adapt(cfg_factory("adapt", f"base={base}", *REGION, "regional_pretrain.epochs=1", "loader.batch_size=8"))
    with pytest.raises(ConfigError, match=r"regional_pretrain.dino.momentum_end"):
        adapt(cfg_factory("adapt", f"base={base}", *REGION, "regional_pretrain.epochs=1",
                          "regional_pretrain.dino.momentum_end=0.5"))
    assert not (tmp_path / "adapt").exists() or not any((tmp_path / "adapt").iterdir())


@pytest.mark.slow
def test_the_collapse_guard_stops_regional_pretraining(base, cfg_factory, tmp_path):
    cfg = cfg_factory("adapt", f"base={base}", *REGION, *REGIONAL, "regional_pretrain.dino.teacher_temp_start=1000",
                      "regional_pretrain.dino.teacher_temp=1000", "regional_pretrain.dino.collapse.patience=3")
    with pytest.raises(CollapseError, match=r"regional pretraining: DINO collapsed .*uniform collapse.*lower "
                                            r"regional_pretrain\.dino\.teacher_temp"):
        adapt(cfg)
    out = tmp_path / "adapt"
    signals = json.loads((out / "regional_pretrain.json").read_text())
    assert signals["collapsed"]["signal"] == "uniform" and len(signals["steps_of_last_epoch"]) == 3
    assert not (out / "adapter.safetensors").exists() and load_record(out)["status"] == "failed"


@pytest.mark.slow
def test_pipeline_reports_the_adapter_with_and_without_regional_pretraining(cfg_factory, tmp_path):
    cfg = cfg_factory("pipeline", "experiment=smoke", "data.limit=200", "region.limit=300", "sweep.sizes=[20,30]",
                      "sweep.adapters=[lora]", "calibration.size=30", "export_region_model=false",
                      "curate_global=false", "logger=none", "regional_pretrain.epochs=1",
                      'adapt_overrides=["adapter.steps=4","regional_pretrain.dino.prototypes=64",'
                      '"regional_pretrain.dino.crops.n_local=2"]')
    result = pipeline(cfg)
    out = result.run_dir
    runs = sorted(p.name for p in (out / "adapt_regional").iterdir())
    assert runs == ["0_lora_n20", "1_lora_n30"]
    assert (out / "adapt_regional" / "0_lora_n20" / "regional_pretrain.safetensors").is_file()
    assert not (out / "adapt_regional" / "1_lora_n30" / "regional_pretrain.json").exists()  # reused, not retrained
    report = (out / "report.md").read_text()
    assert "## Regional pretraining" in report and "after regional pretraining (1 DINO epochs)" in report
    section = report.split("## Regional pretraining")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| lora | ")]
    assert [row.split(" | ")[1] for row in rows] == ["20", "30"]
    with_, without = (json.loads((out / d / "metrics.json").read_text())["test"]["overall"]["accuracy"]
                      for d in ("adapt_regional/1_lora_n30", "adapt/1_lora_n30"))
    assert f"| lora | 30 | {without:.4f} | {with_:.4f} | {with_ - without:+.4f} |" in report
    assert ("lowered the adapter's test accuracy" in report) == any(
        float(r.split(" | ")[3]) < float(r.split(" | ")[2]) for r in rows)
    with pytest.raises(ConfigError, match="adapt_overrides: 'regional_pretrain.epochs=2' would apply to every"):
        pipeline(cfg_factory("pipeline", "regional_pretrain.epochs=1", 'adapt_overrides=["regional_pretrain.epochs=2"]',
                             run_dir=tmp_path / "p2"))
    other = cfg_factory("pipeline", "regional_pretrain.epochs=1", run_dir=tmp_path / "p3")
    other.adapter = "linear_probe"  # `adapter=` on the command line names the adapter config group, not this key
    with pytest.raises(ConfigError, match="regional_pretrain.epochs=1 needs the region's adapter"):
        pipeline(other)
