"""What each adapter method trains, adds, removes and folds."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fmtransfer.adapters import VPT, BitFit, Full, LinearProbe, LoRA, Scratch
from fmtransfer.adapters.methods import (
    adapter_state,
    check_method_fits,
    method_from_description,
    trainable_count,
)
from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.models.classifier import build_classifier

X = torch.randn(3, 1, 16, 16)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def attach(method, model, name):
    method.attach(model, name)
    for p in model.head.parameters():
        p.requires_grad = True
    return trainable_names(model)


def test_linear_probe_trains_only_the_head(cnn):
    model, _ = cnn
    assert attach(LinearProbe(), model, "test_resnet") == {"head.weight", "head.bias"}


def test_bitfit_trains_biases(cnn):
    model, _ = cnn
    names = attach(BitFit(), model, "test_resnet")
    assert names and all(n.endswith("bias") or n.startswith("head.") for n in names)
    assert any(n.startswith("backbone.") for n in names)


def test_full_and_scratch(cnn):
    model, _ = cnn
    before = copy.deepcopy(model.state_dict())
    trainable = attach(Full(), model, "test_resnet")
    assert len(trainable) == len(list(model.parameters()))
    model2 = copy.deepcopy(model)
    model2.load_state_dict(before)
    attach(Scratch(), model2, "test_resnet")
    changed = [k for k, v in model2.backbone.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, before[f"backbone.{k}"])]
    assert changed  # re-initialised
    assert not Scratch.reuse_head and Full.reuse_head


def test_lora_adds_low_rank_layers_on_family_targets(cnn):
    model, _ = cnn
    base_out = model(X)
    names = attach(LoRA(rank=2, train_norms=False), model, "test_resnet")
    assert names - {"head.weight", "head.bias"} and all("lora_" in n or n.startswith("head.") for n in names)
    trainable, total = trainable_count(model)
    assert trainable < 0.25 * total
    assert torch.allclose(model(X), base_out, atol=1e-6)  # LoRA's B starts at zero: no change before training


def test_lora_train_norms_adds_norm_affines(cnn):
    model, _ = cnn
    names = attach(LoRA(rank=2, train_norms=True), model, "test_resnet")
    assert any(".bn" in n or "norm" in n for n in names)


def test_lora_detach_and_merge(cnn):
    model, _ = cnn
    method = LoRA(rank=2)
    base = copy.deepcopy(model)
    method.attach(model, "test_resnet")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    adapted_out = model(X)
    merged, merging = copy.deepcopy(base), LoRA(rank=2)  # what AdapterHost does: attach, load, then merge
    merging.attach(merged, "test_resnet")
    merged.load_state_dict(model.state_dict())
    with pytest.raises(ArtifactError, match="not attached by this method"):
        method.merge(merged)
    merging.merge(merged)
    assert not any("lora" in n for n, _ in merged.named_modules())
    assert {n for n, _ in merged.named_parameters()} == {n for n, _ in base.named_parameters()}
    assert torch.allclose(merged(X), adapted_out, atol=1e-5)
    method.detach(model)
    assert {n for n, _ in model.named_modules()} == {n for n, _ in base.named_modules()}
    assert torch.allclose(model(X), base(X), atol=1e-6)


def test_lora_target_override_and_no_match(cnn):
    model, _ = cnn
    assert LoRA(target_modules=r"layer1\..*conv\d").targets(model.backbone, "test_resnet")
    with pytest.raises(ConfigError, match="matches no Linear or Conv2d layer"):
        LoRA(target_modules=r"nothing_like_this").targets(model.backbone, "test_resnet")


def test_vpt_on_vit(vit):
    model, meta = vit
    base_out = model(X)
    names = attach(VPT(num_tokens=3, deep=True), model, "test_vit")
    assert names == {"backbone.prompts", "head.weight", "head.bias"}
    assert model.backbone.prompts.shape[:2] == (len(model.backbone.vit.blocks), 3)
    assert not torch.allclose(model(X), base_out)  # prompts change the features
    VPT().detach(model)
    assert torch.allclose(model(X), base_out, atol=1e-6)


def test_shallow_vpt_and_merged_structure_rebuilds(vit):
    model, meta = vit
    method = VPT(num_tokens=2, deep=False)
    method.attach(model, "test_vit")
    out = model(X)
    rebuilt = build_classifier({**meta, **method.merged_structure()})
    rebuilt.load_state_dict(model.state_dict())
    assert torch.allclose(rebuilt.eval()(X), model.eval()(X), atol=1e-6) and out.shape == (3, 3)


def test_vpt_on_cnn_is_refused(cnn):
    model, _ = cnn
    with pytest.raises(ConfigError, match="adapter=vpt needs a Vision Transformer.*'resnet' family"):
        VPT().attach(model, "test_resnet")


def test_check_method_fits():
    check_method_fits("vpt", "vit_tiny_patch16_224")
    check_method_fits("lora", "resnet18")
    with pytest.raises(ConfigError, match="adapter=vpt needs a Vision Transformer.*'resnet18'.*'resnet' family"):
        check_method_fits("vpt", "resnet18")
    with pytest.raises(ConfigError, match="adapter='prefix' is not an adapter method; choose from full, scratch"):
        check_method_fits("prefix", "vit_tiny_patch16_224")


def test_adapter_state_holds_only_what_was_adapted(cnn):
    model, _ = cnn
    method = LoRA(rank=2, train_norms=False, norm_stats="adapt")
    attach(method, model, "test_resnet")
    state = adapter_state(model, method)
    assert all("lora_" in k or k.startswith("head.") or "running_" in k or "num_batches" in k for k in state)
    assert any("running_mean" in k for k in state)
    frozen = LinearProbe()
    model2, _ = copy.deepcopy(model), None
    assert not any("running_mean" in k for k in adapter_state(model2, frozen))


def test_methods_rebuild_from_name_only():
    assert isinstance(method_from_description({"name": "lora", "rank": 3, "alpha": 6.0, "dropout": 0.0,
                                               "target_modules": None, "train_norms": True,
                                               "norm_stats": "adapt"}), LoRA)
    with pytest.raises(ConfigError, match="unknown adapter method 'os.system'"):
        method_from_description({"name": "os.system"})


@pytest.mark.parametrize("kw", [{"rank": 0}, {"dropout": 1.5}, {"norm_stats": "sometimes"}])
def test_bad_lora_settings(kw):
    with pytest.raises(ConfigError):
        LoRA(**kw)


def test_frozen_norm_stats_stay_frozen_in_training(cnn):
    from fmtransfer.models.module import SupervisedModule

    model, _ = cnn
    module = SupervisedModule(model, "classification", nn.CrossEntropyLoss(), torch.optim.SGD,
                              frozen_norm_stats=True)
    module.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and model.head.training
