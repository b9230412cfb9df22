"""Model artifacts: safetensors + JSON header, integrity-checked on load."""

from __future__ import annotations

import json

import pytest
import torch

from fmtransfer.data import Preprocess
from fmtransfer.errors import ArtifactError
from fmtransfer.models import Classifier, create_backbone, load_model, save_model
from fmtransfer.models.backbone import BackboneSpec
from fmtransfer.models.classifier import model_meta


@pytest.fixture
def saved(tmp_path):
    spec = BackboneSpec(name="test_vit", in_chans=1, img_size=[16, 16])
    model = Classifier(create_backbone(spec), 3)
    meta = model_meta(model, spec, task="classification", classes=["a", "b", "c"],
                      preprocess=Preprocess((16, 16), 1, (0.5,), (0.5,)))
    save_model(model, meta, tmp_path)
    return model, tmp_path


def test_round_trip(saved):
    model, folder = saved
    loaded, meta = load_model(folder)
    x = torch.randn(2, 1, 16, 16)
    assert torch.allclose(model.eval()(x), loaded(x))
    assert meta["classes"] == ["a", "b", "c"] and meta["embed_dim"] == 64
    for path in (folder / "model.json", folder / "model.safetensors"):
        assert load_model(path)[1]["weights_sha256"] == meta["weights_sha256"]


def test_tampered_weights_are_refused(saved):
    _, folder = saved
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 .* differs"):
        load_model(folder)


def test_not_a_model(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ArtifactError, match="not an fmtransfer model"):
        load_model(tmp_path)
    with pytest.raises(ArtifactError, match="holds no model"):
        load_model(tmp_path / "..")
