"""model_outputs: a saved model, an adapter-less run dir and an ONNX export run over a recipe the same way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fmtransfer.data import Preprocess, build_datamodule, load_recipe
from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.export.onnx_export import embed_metadata
from fmtransfer.export.runtime import ONNX_FORMAT, ONNX_FORMAT_VERSION
from fmtransfer.models import Classifier, create_backbone
from fmtransfer.models.backbone import BackboneSpec
from fmtransfer.models.classifier import model_meta, save_model
from fmtransfer.tasks.model_outputs import open_model
from tests.fixtures import make_npz

CLASSES = ["0", "1", "2"]


def _model(folder: Path) -> tuple[Classifier, dict]:
    torch.manual_seed(0)
    spec = BackboneSpec(name="test_resnet", in_chans=1, img_size=[16, 16])
    model = Classifier(create_backbone(spec), len(CLASSES)).eval()
    meta = model_meta(model, spec, task="classification", classes=CLASSES,
                      preprocess=Preprocess((16, 16), 1, (0.5,), (0.5,)))
    save_model(model, meta, folder)
    return model, meta


def _recipe(tmp_path: Path):
    npz = make_npz(tmp_path / "d.npz", n=40, channels=1)
    return load_recipe({"name": "tiny", "source": {"kind": "npz", "path": str(npz)}, "image_size": [16, 16],
                        "channels": 1, "classes": CLASSES, "split": {"train": 0.5, "val": 0.25, "test": 0.25}})


class _Both(torch.nn.Module):
    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, x):
        f = self.model.features(x)
        return self.model.head(f), f


def _export(model: torch.nn.Module, meta: dict, path: Path, outputs: list[str]) -> Path:
    torch.onnx.export(model, (torch.zeros(2, 1, 16, 16),), str(path), input_names=["input"], output_names=outputs,
                      dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}, opset_version=17,
                      dynamo=False)
    embed_metadata(path, {"format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION, "task": "classification",
                          "classes": CLASSES, "num_outputs": 3, "preprocess": meta["preprocess"],
                          "input_name": "input", "output_name": "logits", "backbone": "test_resnet",
                          "gates_passed": True, "gates": []})
    return path


def test_torch_model_outputs(tmp_path):
    model, _ = _model(tmp_path / "run")
    recipe = _recipe(tmp_path)
    runner = open_model(tmp_path / "run")
    assert runner.identity["kind"] == "torch" and runner.identity["embedding_dim"] == model.embed_dim
    assert runner.identity["sha256"] == json.loads((tmp_path / "run/model.json").read_text())["weights_sha256"]
    out = runner.outputs(recipe, "test", batch_size=4, accelerator="cpu")
    n = len(out.rows)
    assert n == 10 and out.probs.shape == (n, 3) and out.embeddings.shape == (n, model.embed_dim)
    np.testing.assert_allclose(out.probs.sum(1), 1.0, atol=1e-5)
    assert out.targets is not None and out.targets.dtype == np.int64 and out.seconds > 0
    # the rows are the test split's, in table order, and the logits are the model's on those images
    dm = build_datamodule(recipe, {"batch_size": 64, "num_workers": 0}, model_meta=runner.meta, model_classes=True)
    table = dm.prepare()
    np.testing.assert_array_equal(out.rows, table.indices("test"))
    np.testing.assert_array_equal(out.targets, table.targets[out.rows])
    assert out.fingerprint == table.fingerprint
    x = torch.stack([dm.dataset("test")[i][0] for i in range(n)])
    with torch.no_grad():
        np.testing.assert_allclose(out.logits, model(x).numpy(), atol=1e-5)
        np.testing.assert_allclose(out.embeddings, model.features(x).numpy(), atol=1e-5)
    assert len(runner.outputs(recipe, "all", limit=7, accelerator="cpu")) == 7


def test_onnx_with_and_without_an_embedding_output(tmp_path):
    model, meta = _model(tmp_path / "run")
    recipe = _recipe(tmp_path)
    ref = open_model(tmp_path / "run").outputs(recipe, "val", accelerator="cpu")
    both = open_model(_export(_Both(model), meta, tmp_path / "both.onnx", ["logits", "embedding"]))
    assert both.identity["kind"] == "onnx" and both.identity["embedding_dim"] == model.embed_dim
    out = both.outputs(recipe, "val")
    np.testing.assert_allclose(out.probs, ref.probs, atol=1e-4)
    np.testing.assert_allclose(out.embeddings, ref.embeddings, atol=1e-4)
    only = open_model(_export(model, meta, tmp_path / "only.onnx", ["logits"]))
    assert only.identity["embedding_dim"] is None and not only.gives_embeddings
    out = only.outputs(recipe, "val")
    assert out.embeddings is None
    np.testing.assert_allclose(out.probs, ref.probs, atol=1e-4)


def test_clear_errors(tmp_path):
    with pytest.raises(ArtifactError, match="no such file"):
        open_model(tmp_path / "missing")
    with pytest.raises(ConfigError, match="pass model="):
        open_model("")
    _model(tmp_path / "run")
    with pytest.raises(ConfigError, match="not an adapter"):
        open_model(tmp_path / "run", adapter_base=tmp_path / "run")


def test_adapter_over_its_base(tmp_path):
    from fmtransfer.adapters import BitFit
    from tests.adapters.test_artifact import make_adapter

    model, _ = _model(tmp_path / "run")
    meta = json.loads((tmp_path / "run/model.json").read_text())
    make_adapter(model, meta, BitFit(), tmp_path / "region.safetensors", seed=3)
    recipe = _recipe(tmp_path)
    runner = open_model(tmp_path / "region.safetensors", adapter_base=tmp_path / "run")
    assert runner.identity["kind"] == "adapter" and runner.identity["sha256"] != meta["weights_sha256"]
    adapted = runner.outputs(recipe, "val", accelerator="cpu")
    plain = open_model(tmp_path / "run").outputs(recipe, "val", accelerator="cpu")
    assert adapted.probs.shape == plain.probs.shape and not np.allclose(adapted.logits, plain.logits, atol=1e-3)


def test_labels_follow_the_model_and_a_new_crop_is_run_unlabelled(tmp_path):
    """Labels are given as the model's class indices whatever the recipe's class order; data of classes the model
    lacks (a new crop) still runs, without targets and with a note saying why (monitoring a new crop used to stop
    with 'labels not in the class list')."""
    _model(tmp_path / "run")
    npz = make_npz(tmp_path / "d.npz", n=40, channels=1)
    base = {"name": "tiny", "source": {"kind": "npz", "path": str(npz)}, "image_size": [16, 16], "channels": 1,
            "split": {"train": 0.5, "val": 0.25, "test": 0.25}}
    runner = open_model(tmp_path / "run")
    same = runner.outputs(load_recipe({**base, "classes": CLASSES}), "all", accelerator="cpu")
    reordered = runner.outputs(load_recipe({**base, "classes": ["2", "0", "1"]}), "all", accelerator="cpu")
    np.testing.assert_array_equal(reordered.targets, same.targets)
    assert same.label_note is None and same.accuracy is not None
    crop = runner.outputs(load_recipe({**base, "classes": ["a", "b", "c"], "label_map": {"0": "a", "1": "b", "2": "c"}}),
                          "all", accelerator="cpu")
    assert crop.targets is None and crop.accuracy is None and crop.probs.shape == (40, 3)
    assert "classes the model does not (a, b, c" in crop.label_note


def test_no_accuracy_estimate_for_a_new_crop():
    """An estimate of accuracy in the model's classes means nothing on data of other classes: monitor skips it and
    says why, instead of printing a confident-looking 0.825 for Fashion-MNIST under a digit model."""
    from fmtransfer.monitoring.reference import ReferenceStats
    from fmtransfer.tasks.model_outputs import ModelOutputs
    from fmtransfer.tasks.monitor import accuracy_estimate

    probs = np.full((4, 3), 1 / 3)
    stats = ReferenceStats(identity={}, data={}, settings={}, probs=probs, embeddings=None,
                           targets=np.zeros(4, np.int64), temperature=1.0)
    plain = ModelOutputs(probs=probs, embeddings=None, targets=None, classes=CLASSES, rows=np.arange(4), seconds=1.0)
    assert accuracy_estimate(stats, plain)["estimated"] == pytest.approx(1 / 3)
    crop = ModelOutputs(probs=probs, embeddings=None, targets=None, classes=CLASSES, rows=np.arange(4), seconds=1.0,
                        label_note="classes the model does not")
    assert "not the model's" in accuracy_estimate(stats, crop)["skipped"]
