"""The main job on tiny settings: pretrain, global and zero-shot evaluation, report.md with pictures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fmtransfer.config import config_dir
from fmtransfer.errors import ConfigError
from fmtransfer.lineage import load_record
from fmtransfer.tasks.export import GateFailed
from fmtransfer.tasks.pipeline import compose_steps, pipeline, pipeline_settings


@pytest.mark.slow
def test_pipeline_report(cfg_factory, tmp_path):
    result = pipeline(cfg_factory("pipeline", "experiment=smoke", "region.limit=200", "sweep.sizes=[20,40]",
                                  "calibration.size=30", 'adapt_overrides=["adapter.steps=4"]',
                                  # a smoke model has near-tied logits: INT8 gates are for real models
                                  "export.gates.min_int8_agreement=0", "export.gates.max_accuracy_drop=1",
                                  "export.latency.repeats=2",
                                  # 4 steps on 30 labels cannot beat the base on the calibration set: exported anyway
                                  "force=true"))
    out = tmp_path / "pipeline"
    report = (out / "report.md").read_text()
    assert "| global test_resnet | mnist_global | global | test |" in report
    assert "| global test_resnet, zero-shot | uci_digits_region | uci | test |" in report
    assert "| + lora adapter, 30 labels | uci_digits_region | uci | test |" in report
    assert "## Calibration-size plan" in report and "| linear_probe |" in report
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (out / image).is_file(), image
    assert len(re.findall(r"!\[", report)) == 9 and (out / "lineage.png").is_file()  # the 9th: the lineage graph
    # the region monitored against the global data: drift verdicts, the accuracy estimate, the OOD share
    assert "## Monitoring: the region against the global data" in report and "BBSD" in report
    assert "### Unusual samples (OOD)" in report and "\n## Unusual samples" not in report  # inside its section
    assert result.steps["monitor"].metrics["current"]["n"] == 60  # the region's test split, its limit kept
    record = load_record(out)
    stages = [p["stage"] for p in record["parents"]]
    # the global steps (pretraining, curation, pretraining on the curated subset), then the region's
    assert stages[:5] == ["pretrain", "curate", "pretrain", "evaluate", "monitor"] and stages.count("adapt") == 5
    assert stages[-2:] == ["plan", "export"]
    assert "## Edge export" in report and "ONNX INT8 (static)" in report
    assert "## Do no harm" in report and "released with force=true" in report
    assert "## Data curation" in report and "curated 20% of the train split" in report
    assert result.steps["pretrain_curated"].metrics["data"]["splits"][
        "train"] == result.steps["curate"].metrics["selected"]
    # pretrain_curated_steps=equal: the curated subset trains for as many optimisation steps as the full data
    full_steps = result.steps["pretrain"].metrics["global_step"]
    assert result.steps["pretrain_curated"].metrics["global_step"] == full_steps > 1
    assert result.steps["export"].outputs["model"] == out / "export" / "model.int8.onnx"
    assert load_record(out / "zero_shot")["parents"][0]["stage"] == "pretrain"
    assert result.steps["zero_shot"].metrics["overall"]["n"] == 60


@pytest.mark.slow
def test_pipeline_reports_a_rejected_export_then_fails(cfg_factory, tmp_path):
    with pytest.raises(GateFailed, match="fp32_parity"):
        pipeline(cfg_factory("pipeline", "experiment=smoke", "region.limit=200", "sweep.sizes=[20]",
                             "sweep.adapters=[lora]", "calibration.size=20", 'adapt_overrides=["adapter.steps=2"]',
                             "curate_global=false", "export.quantize=none", "export.latency.repeats=1",
                             "export.gates.max_abs_diff=0", "force=true"))
    out = tmp_path / "pipeline"
    report = (out / "report.md").read_text()
    assert "## Edge export" in report and "**Rejected**: export rejected: fp32_parity" in report
    assert "edge export: rejected" in report and (out / "export" / "rejected" / "reason.json").is_file()
    assert load_record(out)["status"] != "ok"


def test_pipeline_checks_sweep_sizes_first(cfg_factory, tmp_path):
    from fmtransfer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sweep.sizes / calibration.size \[300\] exceed the train split"):
        pipeline(cfg_factory("pipeline", "experiment=smoke", "region.limit=200"))
    assert not (tmp_path / "pipeline" / "pretrain").exists()


def test_pipeline_checks_adapt_settings_first(cfg_factory, tmp_path):
    from fmtransfer.errors import ConfigError

    with pytest.raises(ConfigError, match="vpt needs a Vision Transformer"):
        pipeline(cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", "sweep.adapters=[lora,vpt]"))
    with pytest.raises(ConfigError, match="adapter.steps=0"):
        pipeline(cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", 'adapt_overrides=["adapter.steps=0"]'))
    with pytest.raises(ConfigError, match="k=500 is larger than the 240 samples of the global train split"):
        pipeline(cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", "curation.levels=[500,5]"))
    with pytest.raises(ConfigError, match="export.quantize='int4'"):
        pipeline(cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", "export.quantize=int4"))
    assert not (tmp_path / "pipeline" / "pretrain").exists()


def test_pipeline_refuses_an_unknown_curated_pretraining_mode(cfg_factory):
    with pytest.raises(ConfigError, match="pretrain_curated_steps='steps'.*equal"):
        pipeline(cfg_factory("pipeline", "experiment=smoke", "pretrain_curated_steps=steps"))


def test_every_step_is_composed_from_its_stage_config(cfg_factory, tmp_path):
    """Each step's config is its stage's entry config (configs/<stage>.yaml) plus what the pipeline passes on."""
    cfg = cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", "region.limit=200", "seed=7",
                      "export.gates.max_accuracy_drop=0.5")
    out = tmp_path / "pipeline"
    steps = compose_steps(cfg, pipeline_settings(cfg), out)
    # the global steps, then the region's
    assert list(steps.configs) == ["pretrain", "curate", "pretrain_curated", "zero_shot", "monitor", "adapt/0_lora_n20",
                                   "adapt/1_linear_probe_n20", "adapt/2_lora_n100", "plan", "export"]
    plan_yaml = OmegaConf.load(config_dir() / "plan.yaml")
    assert list(steps.configs["plan"].targets) == list(plan_yaml.targets)  # not a copy in the pipeline
    assert steps.configs["plan"].sweep == str(out / "adapt")
    for name, sub in steps.configs.items():
        assert sub.run_dir == str(out / name)
        assert sub.get("seed", 7) == 7
        stage_yaml = OmegaConf.load(config_dir() / f"{sub.stage}.yaml")
        assert set(stage_yaml) - {"defaults"} <= set(sub), name  # every key of the stage's own config
    assert steps.configs["zero_shot"].adapter_file is None and steps.configs["zero_shot"].data.limit == 200
    # monitoring compares the region's recipe (as composed, a limit included) with the global one
    assert steps.configs["monitor"].current.limit == 200 and steps.configs["monitor"].current.name == cfg.region.name
    assert steps.configs["monitor"].reference.name == cfg.data.name
    assert steps.configs["export"].export.gates.max_accuracy_drop == 0.5
    assert steps.configs["adapt/2_lora_n100"].calibration.size == 100
    # only the region's adapter (lora at calibration.size, the one exported) pays for the do-no-harm check
    folds = OmegaConf.load(config_dir() / "adapt.yaml").do_no_harm.folds
    assert folds >= 2 and steps.configs["adapt/2_lora_n100"].do_no_harm.folds == folds
    assert steps.configs["adapt/0_lora_n20"].do_no_harm.folds == steps.configs["adapt/1_linear_probe_n20"].do_no_harm.folds == 0
    # nothing exported, nothing released: no adapter pays for the check
    quiet = compose_steps(cfg, pipeline_settings(OmegaConf.merge(cfg, {"export_region_model": False})), out)
    assert quiet.configs["adapt/2_lora_n100"].do_no_harm.folds == 0
    assert steps.configs["pretrain"].trainer.limit_train_batches == 3  # the smoke trainer
    assert steps.configs["adapt/0_lora_n20"].trainer.limit_train_batches is None  # adapt's own trainer


def test_the_deterministic_switch_reaches_every_training_step(cfg_factory, tmp_path):
    cfg = cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", "deterministic=warn")
    steps = compose_steps(cfg, pipeline_settings(cfg), tmp_path / "pipeline")
    trained = [n for n, sub in steps.configs.items() if sub.stage in ("pretrain", "adapt")]
    assert len(trained) == 5 and all(steps.configs[n].deterministic == "warn" for n in trained)


def test_curate_with_gives_the_curation_another_model(cfg_factory, tmp_path, monkeypatch):
    """curate_with: the curate step embeds with the model given (e.g. a DINO run), not the global model the pipeline
    trains; a missing path, or curate_with without curation, is refused before anything trains."""
    from fmtransfer.tasks import pipeline as pipeline_module
    from fmtransfer.tasks import pipeline_steps
    from fmtransfer.tasks.result import StageResult

    dino = tmp_path / "dino_run"
    dino.mkdir()
    with pytest.raises(ConfigError, match="curate_with='/no/such/run': no such file or folder"):
        pipeline(cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", "curate_with=/no/such/run"))
    with pytest.raises(ConfigError, match="curate_global=false"):
        pipeline(cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", f"curate_with={dino}",
                             "curate_global=false"))
    assert not (tmp_path / "pipeline" / "pretrain").exists()

    cfg = cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", f"curate_with={dino}",
                      "pretrain_curated=false", "export_region_model=false")
    settings = pipeline_settings(cfg)
    steps = compose_steps(cfg, settings, tmp_path / "pipeline")
    bases = {}

    def fake(sub):
        bases[sub.stage] = sub.get("base")
        metrics = {"global_step": 1, "selected": 1}
        return StageResult(sub.stage, Path(sub.run_dir), metrics, {"manifest": "m.csv", "adapter": "a"})

    monkeypatch.setattr(pipeline_steps, "STAGE_FUNCTIONS", dict.fromkeys(pipeline_steps.STAGE_FUNCTIONS, fake))
    steps.record = type("Record", (), {"add_parent": lambda self, _: None})()
    pipeline_module._run(steps, settings)
    assert bases["curate"] == str(dino)
    assert bases["adapt"] == str(tmp_path / "pipeline" / "pretrain")  # the adapters still sit on the global model

