"""``pretrain method=jepa`` end to end on tiny models: a JEPA stage on a tiny DINO teacher (the teacher untouched,
the student saved head-less and scored by evaluate), resume, and the bad input refused before training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fmtransfer.data import Preprocess, load_recipe
from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.lineage import load_record, sha256_file
from fmtransfer.models import load_model
from fmtransfer.models.backbone import backbone_spec, create_backbone
from fmtransfer.models.classifier import Classifier, model_meta, save_model
from fmtransfer.tasks.evaluate import evaluate
from fmtransfer.tasks.pretrain import pretrain
from tests.conftest import make_cfg

# a few steps an epoch; test_vit with patch 4 has a 7x7 token grid at 28 px
TINY = ["experiment=smoke", "backbone=tiny_vit", "loader.batch_size=16", "data.limit=160",
        "trainer.limit_train_batches=4"]
DINO = [*TINY, "method=dino"]
STOP_AFTER_1 = ["+callbacks.stop._target_=tests.helpers.StopAfterEpoch", "+callbacks.stop.epochs=1"]


def jepa(teacher: Path, *more: str) -> list[str]:
    return [*TINY, "method=jepa", f"method.jepa.teacher={teacher}", "trainer.max_epochs=3", *more]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny DINO run on mnist_global, the frozen teacher of every test here (read-only)."""
    return pretrain(make_cfg("pretrain", DINO, tmp_path_factory.mktemp("dino") / "run")).run_dir


@pytest.fixture(scope="module")
def jepa_run(teacher, tmp_path_factory):
    before = sha256_file(teacher / "model.safetensors")
    result = pretrain(make_cfg("pretrain", jepa(teacher), tmp_path_factory.mktemp("jepa") / "run"))
    return result, before


@pytest.mark.slow
def test_jepa_trains_a_student_and_leaves_the_teacher_as_it_was(teacher, jepa_run):
    result, teacher_sha = jepa_run
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    epochs = metrics["jepa"]["epochs"]
    assert metrics["method"] == "jepa" and len(epochs) == 3 and metrics["jepa"]["grid"] == [7, 7]
    assert epochs[-1]["loss"] < epochs[0]["loss"], [e["loss"] for e in epochs]
    assert all(0 < e["mask_ratio"] <= 0.6 for e in epochs)
    # the baseline is the teacher's own kNN accuracy, scored before the first step; the end is the student's
    teacher_metrics = json.loads((teacher / "metrics.json").read_text())
    verdict = metrics["knn_val"]
    assert verdict["initial"] == pytest.approx(teacher_metrics["knn_val"]["final"])
    assert verdict["final"] == epochs[-1]["knn_val_accuracy"]
    assert verdict["helped"] == (verdict["final"] > verdict["initial"])
    assert metrics["test"]["protocol"] == "knn" and metrics["test"]["overall"]["n"] > 0

    assert sha256_file(teacher / "model.safetensors") == teacher_sha  # the teacher's file untouched
    student, meta = load_model(result.run_dir)
    frozen, teacher_meta = load_model(teacher)
    assert meta["num_outputs"] == 0 and meta["task"] == "embedding" and meta["backbone"] == teacher_meta["backbone"]
    info = meta["pretraining"]
    assert info["method"] == "jepa" and info["init"] == "teacher" and info["teacher"]["method"] == "dino"
    assert info["teacher"]["weights_sha256"] == teacher_sha
    assert info["teacher"]["sha256"] == sha256_file(teacher / "model.json")
    assert meta["backbone_weights"]["source"] == "jepa_teacher" and meta["backbone_weights"]["sha256"] == teacher_sha
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, frozen.state_dict()[k])]
    assert moved  # the student learned, starting from the teacher

    record = load_record(result.run_dir)
    roles = {o["role"] for o in record["inputs"]}
    assert {"teacher", "teacher_weights"} <= roles
    assert record["parents"][0]["run_dir"] == str(teacher.resolve())
    assert {"weights", "model", "metrics", "last_checkpoint"} <= {o["role"] for o in record["outputs"]}
    # the checkpoint holds the student and predictor; the teacher is read again from its file on resume
    state = torch.load(result.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not [k for k in state["state_dict"] if k.startswith("teacher.")]
    assert any(k.startswith("predictor.") for k in state["state_dict"])


@pytest.mark.slow
def test_evaluate_scores_the_jepa_student(cfg_factory, jepa_run):
    result, _ = jepa_run
    scored = evaluate(cfg_factory("evaluate", f"model={result.run_dir}", "data=uci_digits_region", "data.limit=200",
                                  "protocol=knn"))
    assert scored.metrics["protocol"] == "knn" and scored.metrics["overall"]["n"] == 60
    assert 0 <= scored.metrics["overall"]["accuracy"] <= 1


@pytest.mark.slow
def test_a_stopped_jepa_run_resumes_to_the_same_student(cfg_factory, teacher, tmp_path):
    args = jepa(teacher, "trainer.max_epochs=2")
    full = pretrain(cfg_factory("pretrain", *args, run_dir=tmp_path / "full"))
    stopped = pretrain(cfg_factory("pretrain", *args, *STOP_AFTER_1, run_dir=tmp_path / "stopped"))
    assert stopped.metrics["epochs"] == 1
    resumed = pretrain(cfg_factory("pretrain", *args, f"resume={stopped.run_dir}", run_dir=tmp_path / "resumed"))
    assert resumed.metrics["global_step"] == full.metrics["global_step"] == 8
    assert [e["epoch"] for e in resumed.metrics["jepa"]["epochs"]] == [1, 2]
    assert resumed.metrics["knn_val"]["initial"] == full.metrics["knn_val"]["initial"]
    a, b = load_file(full.run_dir / "model.safetensors"), load_file(resumed.run_dir / "model.safetensors")
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)  # bit-identical on CPU
    with pytest.raises(ConfigError, match=r"set up differently: method\.jepa\.mask\.max_ratio=0\.6 there, 0\.5 here"):
        pretrain(cfg_factory("pretrain", *args, "method.jepa.mask.max_ratio=0.5", f"resume={stopped.run_dir}",
                             run_dir=tmp_path / "other"))


def _random_teacher(folder: Path, backbone: str, data: str = "mnist_global") -> Path:
    """A head-less model of random weights saved as the framework saves one: a teacher without training."""
    cfg = make_cfg("pretrain", [f"backbone={backbone}", f"data={data}"], folder / "cfg")
    spec, recipe = backbone_spec(cfg.backbone), load_recipe(cfg.data)
    model = Classifier(create_backbone(spec), 0)
    meta = model_meta(model, spec, task="classification", classes=None, preprocess=Preprocess.from_recipe(recipe))
    save_model(model, meta, folder)
    return folder


def test_a_missing_teacher_is_refused(cfg_factory, tmp_path):
    with pytest.raises(ConfigError, match=r"method\.jepa\.teacher is required: .*pretrain method=dino"):
        pretrain(cfg_factory("pretrain", *TINY, "method=jepa"))
    with pytest.raises(ArtifactError, match=rf"method\.jepa\.teacher={tmp_path}/nowhere: .*does not exist"):
        pretrain(cfg_factory("pretrain", *TINY, "method=jepa", f"method.jepa.teacher={tmp_path}/nowhere"))
    assert not (tmp_path / "pretrain" / "checkpoints").exists()


def test_a_teacher_of_another_architecture_is_refused_naming_both(cfg_factory, tmp_path):
    vit = _random_teacher(tmp_path / "vit", "tiny_vit")
    with pytest.raises(ConfigError, match=r"backbone 'test_resnet' is not the architecture of method\.jepa\.teacher "
                                          r"'test_vit'.*backbone\.name='test_resnet' here, 'test_vit' in the teacher.*"
                                          r"backbone\.name=test_vit"):
        pretrain(cfg_factory("pretrain", *TINY, "method=jepa", f"method.jepa.teacher={vit}", "backbone=tiny_cnn"))
    with pytest.raises(ConfigError, match=r"backbone\.patch_size=2 here, 'auto' in the teacher"):
        pretrain(cfg_factory("pretrain", *TINY, "method=jepa", f"method.jepa.teacher={vit}", "backbone.patch_size=2"))


def test_a_cnn_that_leaves_too_few_tokens_is_refused(cfg_factory, tmp_path):
    cnn = _random_teacher(tmp_path / "cnn", "tiny_cnn")
    with pytest.raises(ConfigError, match=r"JEPA needs a token grid of at least 4 positions, but backbone "
                                          r"'test_resnet' reduces data recipe 'mnist_global'.s 28x28 images to 1x1; "
                                          r"use a ViT with a small backbone\.patch_size.*or bigger images"):
        pretrain(cfg_factory("pretrain", *TINY, "method=jepa", f"method.jepa.teacher={cnn}", "backbone=tiny_cnn"))
    assert not (tmp_path / "pretrain" / "checkpoints").exists()


def test_brought_weights_and_training_checkpoints_are_refused(cfg_factory, tmp_path):
    vit = _random_teacher(tmp_path / "vit", "tiny_vit")
    with pytest.raises(ConfigError, match=r"backbone\.checkpoint=.*method\.jepa\.init=teacher.*unset it"):
        pretrain(cfg_factory("pretrain", *TINY, "method=jepa", f"method.jepa.teacher={vit}",
                             f"backbone.checkpoint={vit / 'model.safetensors'}"))
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(ArtifactError, match=r"is a training checkpoint; the teacher is a saved model"):
        pretrain(cfg_factory("pretrain", *TINY, "method=jepa", f"method.jepa.teacher={ckpt}"))


def test_patch_size_auto_and_the_size_it_builds_are_the_same_architecture(cfg_factory, tmp_path):
    from fmtransfer.tasks.pretrain_jepa import check_architecture

    teacher = backbone_spec(cfg_factory("pretrain", "backbone=tiny_vit").backbone).architecture()
    assert teacher["patch_size"] == "auto"
    for patch, fits in ((4, True), (7, False)):  # auto picks 4 at 28 px
        spec = backbone_spec(cfg_factory("pretrain", "backbone=tiny_vit", f"backbone.patch_size={patch}").backbone)
        if fits:
            check_architecture(spec, teacher, tmp_path / "model.json")
        else:
            with pytest.raises(ConfigError, match=r"backbone\.patch_size=7 here, 'auto' in the teacher"):
                check_architecture(spec, teacher, tmp_path / "model.json")
