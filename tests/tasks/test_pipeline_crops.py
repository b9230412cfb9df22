"""A new crop in the pipeline: a region whose classes are not the global model's (no zero-shot: a probe of the frozen
embeddings on the adapter's calibration labels instead), ``region=<recipe>`` beside ``data@region=<recipe>``, and
every region error raised before anything trains."""

from __future__ import annotations

import re

import numpy as np
import pytest
from omegaconf import OmegaConf

from fmtransfer.config import compose_stage, config_dir
from fmtransfer.errors import ConfigError, DataError
from fmtransfer.lineage import load_record
from fmtransfer.tasks import pipeline as pipeline_module
from fmtransfer.tasks.pipeline import compose_steps, pipeline, pipeline_settings

LETTERS = np.array(list("abcdefghij"))


def crop_npz(path, labels=LETTERS, channels: int = 1, n: int | None = None):
    """UCI digits (8x8, upsampled to 24x24 and padded to 28x28) with the labels renamed: the same images as a digit
    region, as classes the global model has never had."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    count = n or len(digits.target)
    images = np.kron(digits.images[:count] * (255 / 16), np.ones((3, 3))).astype(np.uint8)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    if channels > 1:
        images = np.repeat(images[..., None], channels, axis=-1)
    np.savez(path, images=images, labels=labels[digits.target[:count] % len(labels)])
    return path


def crop(path, *extra: str) -> list[str]:
    return ["region=npz", f"region.source.path={path}", "region.channels=1", "region.image_size=[28,28]", *extra]


def test_region_selects_the_recipe_as_data_at_region_does(tmp_path):
    """region=<recipe> (the region group) and data@region=<recipe> give the recipe itself, overrides on top."""
    npz = str(tmp_path / "x.npz")
    recipe = OmegaConf.to_container(compose_stage("pretrain", ["data=npz", f"data.source.path={npz}"]).data)
    for spelling in ("region=npz", "data@region=npz"):
        cfg = compose_stage("pipeline", [spelling, f"region.source.path={npz}"])
        assert OmegaConf.to_container(cfg.region) == recipe, spelling  # nothing of the default region left over
        assert cfg.data.name == "mnist_global"
    fashion = compose_stage("pipeline", ["region=fashion_mnist", "region.limit=30"]).region
    assert fashion.name == "fashion_mnist" and fashion.limit == 30 and fashion.classes[-1] == "boot"
    assert compose_stage("pipeline", []).region.name == "uci_digits_region"  # the default, unchanged


def test_every_data_recipe_is_a_region_option():
    """configs/region/ holds one alias per configs/data recipe, each pointing at its own recipe."""
    recipes = {p.stem for p in (config_dir() / "data").glob("*.yaml")}
    aliases = {p.stem: OmegaConf.load(p) for p in (config_dir() / "region").glob("*.yaml")}
    assert set(aliases) == recipes, f"add configs/region/<name>.yaml for {sorted(recipes - set(aliases))}"
    for name, alias in aliases.items():
        assert list(alias.defaults) == [{"/data@_here_": name}], name


def test_a_region_with_classes_of_its_own_gets_a_probe_in_place_of_zero_shot(cfg_factory, tmp_path):
    npz = crop_npz(tmp_path / "crop.npz", n=300)
    cfg = cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", "calibration.size=30", *crop(npz))
    steps = compose_steps(cfg, pipeline_settings(cfg), tmp_path / "pipeline")
    assert "zero_shot" not in steps.configs
    assert list(steps.configs)[:5] == ["pretrain", "curate", "pretrain_curated", "probe", "monitor"]
    probe = steps.configs["probe"]
    assert probe.stage == "evaluate" and probe.protocol == "linear" and probe.split == "test"
    assert probe.data.name == "npz" and probe.data.subset is None  # the calibration set, once the adapter has it
    assert steps.fit.new_classes == list("abcdefghij") and not steps.fit.zero_shot
    said = steps.skipped["zero-shot"]
    assert "10 of the 10 classes of region 'npz' (a, b, c" in said and "30 calibration labels" in said
    assert "logistic-regression probe" in said
    # the region's images against the global data, through the embeddings; not the head's class probabilities
    assert list(steps.configs["monitor"].monitor.tests) == ["mmd", "domain_classifier"]
    assert steps.configs["monitor"].monitor.ood.enabled and steps.configs["monitor"].current.name == "npz"
    assert "(bbsd, label_shift) are left out, and the region's labels are not read" in steps.notes["monitoring"]

    knn = cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", *crop(npz), "new_classes_score=knn")
    assert compose_steps(knn, pipeline_settings(knn), tmp_path / "knn").configs["probe"].protocol == "knn"
    none = cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", *crop(npz), "new_classes_score=none")
    quiet = compose_steps(none, pipeline_settings(none), tmp_path / "none")
    assert "probe" not in quiet.configs and "no score in its place (new_classes_score=none)" in quiet.skipped["zero-shot"]
    blind = cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", *crop(npz), "monitor_region=false")
    assert "monitor" not in compose_steps(blind, pipeline_settings(blind), tmp_path / "blind").configs


def test_a_region_within_the_global_classes_keeps_zero_shot(cfg_factory, tmp_path):
    """Digits 0-2 only: every class is one the global head predicts, so it scores them."""
    npz = crop_npz(tmp_path / "three.npz", labels=np.array(["0", "1", "2"]), n=300)
    cfg = cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", "calibration.size=30", *crop(npz))
    steps = compose_steps(cfg, pipeline_settings(cfg), tmp_path / "pipeline")
    assert {"zero_shot", "monitor"} <= set(steps.configs) and "probe" not in steps.configs
    assert not steps.skipped and not steps.notes and len(steps.configs["monitor"].monitor.tests) == 4


def test_do_no_harm_folds_in_adapt_overrides_check_the_region_adapter_only(cfg_factory, tmp_path):
    """experiment=demo sets adapt_overrides=[do_no_harm.folds=3]: 3 extra fits for the adapter that is released, not
    for each of the sweep's runs (the plan does not read the check)."""
    cfg = cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", "region.limit=200",
                      'adapt_overrides=["do_no_harm.folds=3"]')
    configs = compose_steps(cfg, pipeline_settings(cfg), tmp_path / "pipeline").configs
    assert configs["adapt/2_lora_n100"].do_no_harm.folds == 3
    assert configs["adapt/0_lora_n20"].do_no_harm.folds == configs["adapt/1_linear_probe_n20"].do_no_harm.folds == 0


@pytest.mark.parametrize(("extra", "error", "message"), [
    # the region's labels against its own class list
    (["region.classes=[a,b]"], DataError, r"sample\(s\) have labels not in the class list \['c', 'd', 'e', 'f'"),
    # images the global model cannot read (6 bands for a 1-channel model)
    (["region.channels=6"], ConfigError, r"region: data recipe 'npz' has data.channels=6, but the model takes 1"),
    (["calibration.size=500"], ConfigError, r"calibration.size \[500\] exceed the train split of region 'npz'"),
    (['adapt_overrides=["do_no_harm.folds=0"]'], ConfigError, r"do_no_harm.folds=0 for the region's adapter"),
    (["new_classes_score=mean"], ConfigError, r"new_classes_score='mean' is not allowed"),
    (["region.source.path=/no/such.npz"], DataError, r"/no/such.npz"),
])
def test_a_region_error_stops_the_pipeline_before_any_training(cfg_factory, tmp_path, monkeypatch, extra, error,
                                                               message):
    npz = crop_npz(tmp_path / "crop.npz", n=300)
    if "region.channels=6" in extra:
        npz = crop_npz(tmp_path / "bands.npz", n=300, channels=6)
    trained = []
    monkeypatch.setitem(pipeline_module.STAGE_FUNCTIONS, "pretrain", lambda sub: trained.append(sub) or 1 / 0)
    with pytest.raises(error, match=message):
        pipeline(cfg_factory("pipeline", "experiment=smoke", "sweep.sizes=[20]", "calibration.size=30",
                             *crop(npz, *extra)))
    assert not trained and not (tmp_path / "pipeline" / "pretrain").exists()


@pytest.mark.slow
def test_pipeline_with_a_new_crop_scores_a_probe_and_says_so(cfg_factory, tmp_path):
    npz = crop_npz(tmp_path / "crop.npz", n=400)
    result = pipeline(cfg_factory("pipeline", "experiment=smoke", *crop(npz), "sweep.sizes=[20]",
                                  "sweep.adapters=[lora]", "calibration.size=40",
                                  'adapt_overrides=["adapter.steps=4"]', "curate_global=false",
                                  "export.gates.min_int8_agreement=0", "export.gates.max_accuracy_drop=1",
                                  "export.latency.repeats=1", "force=true"))
    out = tmp_path / "pipeline"
    report = (out / "report.md").read_text()
    assert "images/s). **No zero-shot score**: 10 of the 10 classes of region 'npz'" in report
    assert "| global test_resnet, frozen embeddings + logistic-regression probe on the 40 calibration labels " \
           "(no zero-shot: new classes) | npz |" in report
    assert "| + lora adapter, 40 labels | npz |" in report
    assert "- zero-shot: skipped" in report
    assert "## Monitoring: the region against the global data\n\n**Region with classes of its own**: 10 of the 10" \
           in report and "MMD" in report and "BBSD" not in report
    monitored = result.steps["monitor"].metrics
    assert set(monitored["tests"]) == {"mmd", "domain_classifier"} and monitored["current"]["labels_not_used"]
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (out / image).is_file(), image
    probe = result.steps["probe"].metrics
    assert probe["protocol"] == "linear" and probe["classes"] == list("abcdefghij")
    assert probe["data"]["splits"]["train"] == 40  # the adapter's calibration set, no more labels
    assert probe["overall"]["n"] == result.steps["adapt"].metrics["test"]["overall"]["n"]
    harm = result.steps["adapt"].metrics["do_no_harm"]
    assert harm["checked"] and "logistic regression" in harm["comparator"]
    stages = [p["stage"] for p in load_record(out)["parents"]]
    assert stages == ["pretrain", "monitor", "adapt", "adapt", "evaluate", "plan", "export"]
    assert result.steps["export"].outputs["model"] == out / "export" / "model.int8.onnx"
