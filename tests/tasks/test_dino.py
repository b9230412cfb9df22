"""``pretrain method=dino`` end to end on tiny models: a healthy run, a forced collapse, unlabelled recipes, the bad
input refused before training, and the head-less model in evaluate (knn, linear), adapt and curate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fmtransfer.errors import ConfigError, DataError
from fmtransfer.lineage import load_record
from fmtransfer.models import load_model
from fmtransfer.models.dino import CollapseError
from fmtransfer.tasks.adapt import adapt
from fmtransfer.tasks.evaluate import evaluate
from fmtransfer.tasks.pretrain import pretrain
from tests.conftest import make_cfg
from tests.fixtures import pattern, save_image

# one epoch of a few steps; batch 16 is DINO's smallest (method.dino.min_batch_size)
DINO = ["experiment=smoke", "method=dino", "loader.batch_size=16", "data.limit=160", "trainer.limit_train_batches=4"]


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory) -> Path:
    """A healthy tiny DINO run on mnist_global (labelled: the kNN accuracy is logged), shared read-only."""
    return pretrain(make_cfg("pretrain", DINO, tmp_path_factory.mktemp("dino") / "run")).run_dir


def _flat_folder(root: Path, n: int = 40, size: int = 16) -> Path:
    """Images directly in ``root``: no class folders, so no labels."""
    rng = np.random.default_rng(0)
    for i in range(n):
        save_image(pattern(i % 3, size, rng, 1), root / f"{i:03d}.png")
    return root


@pytest.mark.slow
def test_healthy_run_records_signals_and_saves_a_headless_teacher(dino_run):
    metrics = json.loads((dino_run / "metrics.json").read_text())
    epochs = metrics["dino"]["epochs"]
    assert len(epochs) == 1 and "collapsed" not in metrics
    signals = epochs[0]
    for key in ("loss", "ln_prototypes", "teacher_entropy", "teacher_mean_entropy", "kl", "embedding_std",
                "healthy_std", "knn_val_accuracy"):
        assert np.isfinite(signals[key]), key
    assert signals["ln_prototypes"] == pytest.approx(np.log(metrics["dino"]["prototypes"]))
    assert signals["prototypes_in_use"] == pytest.approx(np.exp(signals["teacher_mean_entropy"]))
    assert 1 <= signals["prototypes_in_use"] <= metrics["dino"]["prototypes"]
    assert signals["prototypes_reachable"] == 32  # min(1024 prototypes, 2 views x batch 16)
    assert signals["partial_collapse"] is False and metrics["dino"]["partial_collapse_epochs"] == []
    assert 0 <= signals["knn_val_accuracy"] <= 1
    verdict = metrics["knn_val"]  # the starting weights' kNN, scored before the first step, against the end's
    assert verdict["final"] == signals["knn_val_accuracy"] and 0 <= verdict["initial"] <= 1
    assert verdict["helped"] == (verdict["final"] > verdict["initial"])
    assert metrics["test"]["protocol"] == "knn" and metrics["test"]["overall"]["n"] > 0
    assert (dino_run / "collapse_signals.png").is_file()
    model, meta = load_model(dino_run)
    assert meta["num_outputs"] == 0 and meta["task"] == "embedding" and meta["classes"] is None
    assert meta["pretraining"]["method"] == "dino"
    assert model.num_outputs == 0 and not [k for k in model.state_dict() if k.startswith("head.")]
    roles = {o["role"] for o in load_record(dino_run)["outputs"]}
    assert {"weights", "model", "metrics", "collapse_signals", "last_checkpoint"} <= roles


@pytest.mark.slow
def test_run_forced_to_collapse_stops_in_its_first_epoch(cfg_factory, tmp_path):
    """A teacher so hot that its output is uniform: the loss sits at ln K from the first step."""
    cfg = cfg_factory("pretrain", *DINO, "trainer.max_epochs=3", "method.dino.teacher_temp_start=1000",
                      "method.dino.teacher_temp=1000", "method.dino.collapse.patience=3")
    with pytest.raises(CollapseError, match=r"DINO collapsed at epoch 1, step 3: .*uniform collapse.*"
                                            r"lower method\.dino\.teacher_temp") as caught:
        pretrain(cfg)
    assert caught.value.signal == "uniform"
    out = tmp_path / "pretrain"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["collapsed"]["signal"] == "uniform" and len(metrics["dino"]["steps_of_last_epoch"]) == 3
    assert (out / "collapse_signals.png").is_file() and not (out / "model.json").exists()
    assert load_record(out)["status"] == "failed"


@pytest.mark.slow
def test_unlabelled_image_folder_trains_and_is_refused_for_supervised(cfg_factory, tmp_path):
    root = _flat_folder(tmp_path / "flat")
    data = ["data=image_folder", f"data.source.root={root}", "data.channels=1", "data.image_size=[16,16]",
            "data.limit=null"]
    with pytest.raises(DataError, match=r"has no labels: .*holds images but no class folders.*method=dino"):
        pretrain(cfg_factory("pretrain", "experiment=smoke", *data, run_dir=tmp_path / "supervised"))
    # a ViT: local views of another size than the global ones go through the same backbone
    result = pretrain(cfg_factory("pretrain", *DINO, "backbone=tiny_vit", *data, run_dir=tmp_path / "dino"))
    assert result.metrics["test"] is None and "knn_val_accuracy" not in result.metrics["dino"]["epochs"][0]
    assert result.metrics["data"]["labelled"] is False
    assert load_model(result.run_dir)[1]["num_outputs"] == 0


@pytest.mark.slow
def test_csv_without_label_column_trains(cfg_factory, tmp_path):
    _flat_folder(tmp_path / "images")
    manifest = tmp_path / "pool.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([["path"], *[[f"images/{i:03d}.png"] for i in range(40)]])
    data = ["data=csv_manifest", f"data.source.path={manifest}", "data.channels=1", "data.image_size=[16,16]",
            "data.limit=null"]
    with pytest.raises(DataError, match=r"has no column 'label' \(data.source.columns.label"):
        pretrain(cfg_factory("pretrain", "experiment=smoke", *data, run_dir=tmp_path / "supervised"))
    result = pretrain(cfg_factory("pretrain", *DINO, *data, run_dir=tmp_path / "dino"))
    assert len(result.metrics["dino"]["epochs"]) == 1


@pytest.mark.parametrize("overrides,error,message", [
    (["loader.batch_size=8"], ConfigError, r"loader.batch_size=8 is too small for DINO's centring"),
    (["backbone=tiny_vit", "method.dino.crops.local_size=13"], ConfigError,
     r"local_size=13 does not fit the backbone's patch size 4: .*12 or 16"),
    (["method.dino.teacher_temp=0"], ConfigError, r"method.dino.teacher_temp=0 must be > 0"),
], ids=["batch_too_small", "crop_vs_patch", "temperature"])
def test_bad_settings_are_refused_before_training(cfg_factory, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        pretrain(cfg_factory("pretrain", *DINO, *overrides))
    assert not (tmp_path / "pretrain" / "checkpoints").exists()


def test_a_single_image_is_refused_before_training(cfg_factory, tmp_path):
    root = _flat_folder(tmp_path / "one", n=1)
    with pytest.raises(DataError, match="holds a single image"):
        pretrain(cfg_factory("pretrain", *DINO, "data=image_folder", f"data.source.root={root}", "data.channels=1",
                             "data.image_size=[16,16]", "data.limit=null"))
    assert not (tmp_path / "pretrain" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_evaluate_scores_a_headless_model(cfg_factory, dino_run, protocol):
    result = evaluate(cfg_factory("evaluate", f"model={dino_run}", "data=uci_digits_region", "data.limit=200",
                                  f"protocol={protocol}"))
    overall = result.metrics["overall"]
    assert result.metrics["protocol"] == protocol and overall["n"] == 60 and 0 <= overall["accuracy"] <= 1
    assert result.metrics["classes"] == [str(i) for i in range(10)]
    assert (result.run_dir / "predictions_test.csv").is_file() and (result.run_dir / "confusion_test.png").is_file()


@pytest.mark.slow
def test_evaluate_measures_the_batchnorm_statistics_of_a_model_that_never_trained(cfg_factory, dino_run, tmp_path):
    """A random ResNet's placeholder statistics (mean 0, variance 1) flatter its features (bench_ssl's random-init
    row); evaluate measures them on the train split, on a copy, and keeps a trained model's own."""
    import torch

    untrained = pretrain(make_cfg("pretrain", [*DINO, "trainer.max_epochs=0"], tmp_path / "untrained")).run_dir
    before = {k: v.clone() for k, v in load_model(untrained)[0].state_dict().items()}
    data = ["data=uci_digits_region", "data.limit=200", "protocol=knn"]
    fresh = evaluate(cfg_factory("evaluate", f"model={untrained}", *data, run_dir=tmp_path / "e0"))
    assert fresh.metrics["norm_statistics"] == "measured on the train split (the model had none)"
    assert all(torch.equal(v, before[k]) for k, v in load_model(untrained)[0].state_dict().items())
    trained = evaluate(cfg_factory("evaluate", f"model={dino_run}", *data, run_dir=tmp_path / "e1"))
    assert trained.metrics["norm_statistics"] == "the model's"


@pytest.mark.slow
def test_evaluate_refuses_head_protocol_on_a_headless_model(cfg_factory, dino_run):
    with pytest.raises(ConfigError, match=r"has no head .*protocol=knn or protocol=linear"):
        evaluate(cfg_factory("evaluate", f"model={dino_run}", "data=uci_digits_region", "data.limit=200"))


def test_evaluate_protocol_errors_before_loading(cfg_factory, tmp_path):
    with pytest.raises(ConfigError, match=r"protocol='nearest'; expected one of head, knn, linear"):
        evaluate(cfg_factory("evaluate", f"model={tmp_path}/none", "protocol=nearest"))
    with pytest.raises(ConfigError, match=r"protocol=knn learns from the train split"):
        evaluate(cfg_factory("evaluate", f"model={tmp_path}/none", "protocol=knn", "split=train"))


@pytest.mark.slow
def test_adapt_gives_a_headless_base_a_new_head(cfg_factory, dino_run, tmp_path):
    result = adapt(cfg_factory("adapt", f"base={dino_run}", "data=uci_digits_region", "data.limit=300",
                               "adapter=linear_probe", "adapter.steps=6", "calibration.size=30", "logger=none"))
    assert result.metrics["head"] == "new head (the base has none: a self-supervised backbone)"
    assert result.metrics["zero_shot"] is None and 0 <= result.metrics["test"]["overall"]["accuracy"] <= 1
    scored = evaluate(cfg_factory("evaluate", f"adapter_file={result.outputs['adapter']}", "data=uci_digits_region",
                                  "data.limit=300", run_dir=tmp_path / "eval"))
    assert scored.metrics["overall"]["n"] == result.metrics["test"]["overall"]["n"]


@pytest.mark.slow
def test_curate_embeds_with_a_headless_model(cfg_factory, dino_run):
    from fmtransfer.tasks.curate import curate

    result = curate(cfg_factory("curate", f"base={dino_run}", "data=mnist_global", "data.limit=300",
                                "curation.levels=[12,4]", "curation.resampling_steps=2", "curation.target_size=0.3"))
    assert result.metrics["selected"] > 0 and (result.run_dir / "curated.csv").is_file()


@pytest.mark.slow
def test_export_releases_a_headless_model_as_an_embedding_model(cfg_factory, dino_run, tmp_path):
    from fmtransfer.export.predict import predict_files
    from fmtransfer.export.runtime import OnnxModel
    from fmtransfer.tasks.export import export

    # the release of a head-less model is under test, not INT8's accuracy: the kNN score of a 4-step tiny model on
    # 60 gate images moves by a few images under INT8 (0.033 once the DINO ResNet's residual branches started live)
    result = export(cfg_factory("export", f"model={dino_run}", "data=mnist_global", "data.limit=300",
                                "export.latency.repeats=2", "export.latency.warmup=1", "export.calibration.size=64",
                                "export.gates.max_accuracy_drop=0.1"))
    m = result.metrics
    assert m["passed"] and [g["name"] for g in m["gates"]] == ["fp32_parity", "int8_accuracy_drop"]
    assert "kNN accuracy" in m["gates"][1]["detail"] and 0 <= m["variants"][0]["accuracy"] <= 1
    onnx = OnnxModel.load(result.outputs["model"])
    assert onnx.meta["task"] == "embedding" and onnx.meta["output_name"] == "embedding"
    assert onnx.meta["num_outputs"] == load_model(dino_run)[1]["embed_dim"]
    with pytest.raises(DataError, match="head-less backbone: it outputs embeddings"):
        predict_files(result.outputs["model"], _flat_folder(tmp_path / "new"), tmp_path / "p.csv")


@pytest.mark.parametrize(("start", "end", "helped"), [(0.83, 0.78, False), (0.83, 0.83, False), (0.80, 0.91, True)])
def test_a_run_that_did_not_raise_the_knn_accuracy_says_so(start, end, helped, caplog):
    from types import SimpleNamespace

    from fmtransfer.tasks.pretrain_dino import knn_verdict

    module = SimpleNamespace(initial_knn=start, history=[{"knn_val_accuracy": 0.5}, {"knn_val_accuracy": end}])
    with caplog.at_level("INFO", logger="fmtransfer.tasks.pretrain_dino"):
        verdict = knn_verdict(module, "resnet18")
    assert verdict == {"initial": start, "final": end, "gain": pytest.approx(end - start), "helped": helped}
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert bool(warned) is not helped
    if warned:
        assert f"{end:.4f} after pretraining and {start:.4f} with the starting weights of resnet18" in warned[0].message
    assert knn_verdict(SimpleNamespace(initial_knn=None, history=[]), "resnet18") is None


@pytest.mark.parametrize(("kwargs", "alike"), [([], False), (["+backbone.kwargs.zero_init_last=true"], True)])
def test_a_new_resnet_student_tells_images_apart(cfg_factory, kwargs, alike):
    """timm zeroes ResNet's residual branches; at 28x28 the shortcut path then reads one corner pixel and every image
    gets the same features, so DINO's teacher starts uniform. The DINO student is built with normal branches
    (what a user sets explicitly is kept)."""
    import torch

    from fmtransfer.tasks.pretrain_dino import student_backbone, validate_dino

    recipe, spec, settings = validate_dino(cfg_factory("pretrain", *DINO, "backbone=resnet18", *kwargs))
    backbone, _ = student_backbone(spec, recipe, settings)
    images = torch.zeros(8, 1, 28, 28)  # a digit-like set: strokes in the middle, a blank border
    images[:, :, 6:24, 6:24] = torch.rand(8, 1, 18, 18, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = backbone.eval()(images)
    spread = float(features.std(0).mean())
    assert (spread < 1e-6) if alike else (spread > 1e-3), spread
