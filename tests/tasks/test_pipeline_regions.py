"""Many regions in one pipeline: ``regions=[...]`` runs each region's steps in regions/<name>/ over the one global model,
with per-region settings, one row per region in report.md, and a change to one region reruns only that region's steps."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fmtransfer.errors import ConfigError
from fmtransfer.lineage import load_record
from fmtransfer.tasks import pipeline_steps
from fmtransfer.tasks.pipeline import compose_steps, pipeline, pipeline_settings
from tests.tasks.test_pipeline_crops import crop_npz


def _crop(npz, **own) -> str:
    """A regions entry: the crop npz as its own recipe (npz over the packaged one), plus its own settings."""
    extra = "".join(f",{k}:{v}" for k, v in own.items())
    return f"{{data:{{recipe:npz,source:{{path:'{npz}'}},channels:1,image_size:[28,28]}},name:crop{extra}}}"


def _regions(npz, *crop_settings: str) -> str:
    own = dict(s.split(":", 1) for s in crop_settings)
    return f"regions=[{{data:uci_digits_region,name:uci}},{_crop(npz, **own)}]"


def test_each_region_gets_its_own_steps_and_settings(cfg_factory, tmp_path):
    npz = crop_npz(tmp_path / "crop.npz", n=300)
    cfg = cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", "calibration.size=30",
                      _regions(npz, "calibration:{size:40}", "sweep:{sizes:[25],adapters:[lora]}"))
    out = tmp_path / "pipeline"
    steps = compose_steps(cfg, pipeline_settings(cfg), out)
    assert [r.name for r in steps.regions] == ["uci", "crop"]
    assert list(steps.configs)[:3] == ["pretrain", "curate", "pretrain_curated"]  # once, for every region
    uci = [n for n in steps.configs if n.startswith("regions/uci/")]
    assert uci == ["regions/uci/zero_shot", "regions/uci/monitor", "regions/uci/adapt/0_lora_n20",
                   "regions/uci/adapt/1_linear_probe_n20", "regions/uci/adapt/2_lora_n30", "regions/uci/plan",
                   "regions/uci/export"]
    crop = [n for n in steps.configs if n.startswith("regions/crop/")]
    # its own calibration size and sweep; a probe in zero-shot's place (its classes are letters)
    assert crop == ["regions/crop/probe", "regions/crop/monitor", "regions/crop/adapt/0_lora_n25",
                    "regions/crop/adapt/1_lora_n40", "regions/crop/plan", "regions/crop/export"]
    assert "regions/crop/zero-shot" in steps.skipped and "regions/uci/zero-shot" not in steps.skipped
    assert steps.configs["regions/crop/plan"].sweep == str(out / "regions" / "crop" / "adapt")
    assert steps.configs["regions/crop/export"].data.source.path == str(npz)
    assert steps.configs["regions/uci/export"].data.name == "uci_digits_region"
    assert steps.configs["regions/crop/adapt/1_lora_n40"].do_no_harm.folds >= 2  # the crop's released adapter
    assert steps.configs["regions/crop/adapt/0_lora_n25"].do_no_harm.folds == 0
    for name, sub in steps.configs.items():
        assert sub.run_dir == str(out / name)
    assert steps.configs["regions/crop/monitor"].current.source.path == str(npz)


def test_one_region_keeps_its_steps_at_the_top_level(cfg_factory, tmp_path):
    cfg = cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]")
    steps = compose_steps(cfg, pipeline_settings(cfg), tmp_path / "p")
    assert [r.name for r in steps.regions] == [""] and "zero_shot" in steps.configs and "plan" in steps.configs
    assert not any(n.startswith("regions/") for n in steps.configs)


@pytest.mark.parametrize(("regions", "message"), [
    ("regions=[{data:uci_digits_region,calibraton:{size:5}}]",
     r"regions\[0\]: unknown key\(s\) calibraton; a region takes data, name and adapter, calibration"),
    ("regions=[uci_digits_region,uci_digits_region]",
     r"regions\[1\] and regions\[0\] are both named 'uci_digits_region'.*give one of them its own name"),
    ("regions=[no_such_recipe]", r"regions\[0\].data='no_such_recipe': no such data recipe"),
    ("regions=[{data:uci_digits_region,name:'a/b'}]", r"regions\[0\].name='a/b': a region's name is its folder"),
    ("regions=[{name:x}]", r"regions\[0\]: expected a data recipe's name .* got \{'name': 'x'\}"),
    ("regions=[{data:uci_digits_region,calibration:{size:5000}}]",
     r"regions\[0\] \(uci_digits_region\): sweep.sizes / calibration.size \[5000\] exceed the train split"),
    ("regions=[{data:uci_digits_region,new_classes_score:maybe}]", r"regions\[0\] \(uci_digits_region\): .*maybe"),
    ("regions=[{data:uci_digits_region,adapter:nope}]", r"regions\[0\].adapter / sweep.adapters: .*nope"),
])
def test_a_region_error_names_the_region_before_any_training(cfg_factory, tmp_path, monkeypatch, regions, message):
    trained = []
    monkeypatch.setitem(pipeline_steps.STAGE_FUNCTIONS, "pretrain", lambda sub: trained.append(sub) or 1 / 0)
    with pytest.raises(ConfigError, match=message):
        pipeline(cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", regions))
    assert not trained and not (tmp_path / "pipeline" / "pretrain").exists()


def test_rerun_takes_a_folder_of_steps(cfg_factory, tmp_path):
    npz = crop_npz(tmp_path / "crop.npz", n=300)
    cfg = cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", _regions(npz), "rerun=[regions/crop]")
    steps = compose_steps(cfg, pipeline_settings(cfg), tmp_path / "p")
    assert steps.wants_rerun("regions/crop/adapt/0_lora_n20") and steps.wants_rerun("regions/crop/plan")
    assert not steps.wants_rerun("regions/uci/plan") and not steps.wants_rerun("pretrain")
    with pytest.raises(ConfigError, match=r"no step named regions/cropp;.*\(or a folder of them"):
        compose_steps(*(lambda c: (c, pipeline_settings(c)))(
            cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", _regions(npz), "rerun=[regions/cropp]")),
            tmp_path / "q")


SMALL = ["experiment=smoke", "sweep.sizes=[20]", "sweep.adapters=[lora]", "calibration.size=30",
         'adapt_overrides=["adapter.steps=2"]', "curate_global=false", "pretrain_curated=false",
         "export.gates.min_int8_agreement=0", "export.gates.max_accuracy_drop=1", "export.latency.repeats=1",
         "force=true"]


@pytest.mark.slow
def test_two_regions_one_report_and_a_change_reruns_only_its_region(cfg_factory, tmp_path):
    npz = crop_npz(tmp_path / "crop.npz", n=300)
    regions = f"regions=[{{data:{{recipe:uci_digits_region,limit:200}},name:uci}},{_crop(npz)}]"
    first = pipeline(cfg_factory("pipeline", *SMALL, regions, run_dir=tmp_path / "first"))
    out = tmp_path / "first"
    report = (out / "report.md").read_text()
    assert "## Regions\n\n| region | recipe | classes |" in report
    assert re.search(r"\| uci \| uci_digits_region \| 10 \| [0-9.]+ \(zero-shot\) \| lora, 30 labels \|", report)
    assert re.search(r"\| crop \| npz \| 10 \(10 new\) \| [0-9.]+ \(probe\) \| lora, 30 labels \|", report)
    for heading in ("## Region uci", "## Region crop", "## uci: Do no harm", "## crop: Do no harm",
                    "## uci: Edge export", "## crop: Edge export", "## crop: Monitoring: the region against the global"):
        assert heading in report, heading
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (out / image).is_file(), image
    assert (out / "lineage_uci.png").is_file() and (out / "lineage_crop.png").is_file()
    for name in ("uci", "crop"):
        assert (out / "regions" / name / "export" / "model.int8.onnx").is_file()
        assert first.steps[f"regions/{name}/adapt"].metrics["calibration"]["size"] == 30
    stages = [p["stage"] for p in load_record(out)["parents"]]
    assert stages.count("pretrain") == 1 and stages.count("export") == 2 and stages.count("plan") == 2
    # the crop's adapter sits on the same global model as the uci one
    assert {Path(first.steps[f"regions/{n}/adapt"].metrics["base"]).parent for n in ("uci", "crop")} == {out / "pretrain"}

    # one region's calibration size changes: only that region's adapt, plan and export (and its probe) run again
    changed_crop = _crop(npz, calibration="{size:40}")
    regions2 = f"regions=[{{data:{{recipe:uci_digits_region,limit:200}},name:uci}},{changed_crop}]"
    again = pipeline(cfg_factory("pipeline", *SMALL, regions2, run_dir=tmp_path / "second"))
    second = tmp_path / "second"
    names = [n for n in again.steps if n not in ("regions/uci/adapt", "regions/crop/adapt")]  # (the aliases)
    ran = {n for n in names if not (second / n).is_symlink()}
    # the crop's n=20 run reads nothing that changed; the probe reads the new adapter's calibration set
    assert ran == {"regions/crop/adapt/1_lora_n40", "regions/crop/probe", "regions/crop/plan", "regions/crop/export"}, ran
    assert len(names) == 13 and "regions/uci/export" in names


def test_regions_not_released_are_named_after_every_region_ran(cfg_factory, tmp_path, monkeypatch):
    """A refused region does not stop the others; the pipeline then fails naming every region not released."""
    from omegaconf import OmegaConf

    from fmtransfer.adapters.harm import DoNoHarmRefused
    from fmtransfer.lineage import RunRecord
    from fmtransfer.tasks import pipeline as pipeline_module
    from fmtransfer.tasks.pipeline import RegionsNotReleased
    from fmtransfer.tasks.result import StageResult

    def fake_pretrain(sub):
        with RunRecord("pretrain", Path(sub.run_dir), OmegaConf.create({"stage": "pretrain"})):
            pass
        return StageResult("pretrain", Path(sub.run_dir), {}, {})

    ran = []

    def fake_region(steps, region, base):
        ran.append(region.name)
        return DoNoHarmRefused(f"the {region.name} adapter does not beat its base") if region.name == "uci" else None

    monkeypatch.setitem(pipeline_steps.STAGE_FUNCTIONS, "pretrain", fake_pretrain)
    monkeypatch.setattr(pipeline_module, "run_region", fake_region)
    monkeypatch.setattr(pipeline_module.pipeline_report, "write",
                        lambda steps, record, rejected: StageResult("pipeline", steps.out))
    npz = crop_npz(tmp_path / "crop.npz", n=300)
    with pytest.raises(RegionsNotReleased, match=r"1 of 2 regions not released \(uci\), the others were; .*report.md "
                                                 r"has every region's figures. uci: the uci adapter does not beat"):
        pipeline(cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", "curate_global=false", _regions(npz)))
    assert ran == ["uci", "crop"]
