"""Adapter files: integrity, refusal of the wrong base, and switching regions on one loaded base."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from fmtransfer.adapters import AdapterHost, BitFit, LoRA, read_adapter, save_adapter
from fmtransfer.adapters.head import region_head
from fmtransfer.adapters.methods import adapter_state
from fmtransfer.errors import ArtifactError

X = torch.randn(4, 1, 16, 16)


def make_adapter(model, meta, method, path, classes=("0", "1", "2"), seed=0):
    """Attach, perturb the trainable weights as training would, save; leaves ``model`` untouched."""
    work = copy.deepcopy(model)
    work.head, _ = region_head(work.head, meta["classes"], list(classes))
    method.attach(work, meta["backbone"]["name"])
    for p in work.head.parameters():
        p.requires_grad = True
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in work.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    header = {"method": method.describe(), "base": {"sha256": meta["weights_sha256"], "path": "/base"},
              "task": "classification", "classes": list(classes), "num_outputs": len(classes),
              "preprocess": meta["preprocess"], "lineage": {}}
    save_adapter(path, adapter_state(work, method), header)
    return work.eval()(X).detach()


def test_round_trip_and_switching(cnn, tmp_path):
    base, meta = cnn
    base_out = base(X).detach()
    out_a = make_adapter(base, meta, LoRA(rank=2), tmp_path / "a.safetensors")
    out_b = make_adapter(base, meta, BitFit(), tmp_path / "b.safetensors", classes=("0", "1", "2", "new"), seed=1)
    host = AdapterHost(base, meta)
    meta_a = host.apply(*read_adapter(tmp_path / "a.safetensors"))
    assert torch.allclose(host.model(X), out_a, atol=1e-5) and meta_a["classes"] == ["0", "1", "2"]
    meta_b = host.apply(*read_adapter(tmp_path / "b.safetensors"))  # switch: no reload of the base
    assert torch.allclose(host.model(X), out_b, atol=1e-5) and meta_b["num_outputs"] == 4
    host.apply(*read_adapter(tmp_path / "a.safetensors"))
    assert torch.allclose(host.model(X), out_a, atol=1e-5)
    host.reset()
    assert torch.allclose(host.model(X), base_out, atol=1e-6)  # the base is exactly as loaded


def test_wrong_base_is_refused(cnn, tmp_path):
    base, meta = cnn
    make_adapter(base, meta, LoRA(rank=2), tmp_path / "a.safetensors")
    other = {**meta, "weights_sha256": "cd" * 32}
    with pytest.raises(ArtifactError, match="was trained on base abababababab"):
        AdapterHost(base, other).apply(*read_adapter(tmp_path / "a.safetensors"))


def test_tampered_and_truncated_files(cnn, tmp_path):
    base, meta = cnn
    path = tmp_path / "a.safetensors"
    make_adapter(base, meta, LoRA(rank=2), path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x55
    (tmp_path / "tampered.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="do not match the sha256"):
        read_adapter(tmp_path / "tampered.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError, match="truncated or not an adapter"):
        read_adapter(tmp_path / "cut.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ArtifactError, match="not an fmtransfer adapter"):
        read_adapter(tmp_path / "plain.safetensors")
    with pytest.raises(ArtifactError, match="does not exist"):
        read_adapter(tmp_path / "none.safetensors")


def test_region_head_reuses_known_classes(cnn):
    base, meta = cnn
    head, note = region_head(base.head, ["0", "1", "2"], ["2", "0", "weeds"])
    assert torch.equal(head.weight[0], base.head.weight[2]) and torch.equal(head.weight[1], base.head.weight[0])
    assert "2 of 3 classes" in note
    same, note = region_head(base.head, ["0", "1", "2"], ["0", "1", "2"])
    assert torch.equal(same.weight, base.head.weight) and note.startswith("global head")
    fresh, note = region_head(base.head, ["0", "1", "2"], ["0", "1", "2"], reuse=False)
    assert not torch.equal(fresh.weight, base.head.weight)
