"""Foundation weights a user brings: DINO-style checkpoints, position embeddings, input channels, clear errors.

Every checkpoint is written by the test into tmp_path; nothing is downloaded (the hub tests switch the hub off).
"""

from __future__ import annotations

import argparse
import socket
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.models.backbone import BackboneSpec, backbone_spec, create_backbone, hub_error, weights_record


def spec(name="vit_tiny_patch16_224", **kw):
    return BackboneSpec(name=name, **{"in_chans": 3, "img_size": [32, 32], **kw})


def vit_source(seed=0):
    """timm's test ViT as create_backbone builds it for 32 px RGB images (patch 4), with weights of its own."""
    torch.manual_seed(seed)
    return timm.create_model("test_vit", num_classes=0, img_size=32, patch_size=4).eval()


def dino_head():
    return {"head.mlp.0.weight": torch.randn(8, 64), "head.mlp.0.bias": torch.randn(8),
            "head.last_layer.weight_g": torch.randn(16, 1)}


def dino(teacher, student):
    """facebookresearch/dino's checkpoint.pth: both networks (the student under DDP), heads, its args."""
    return {"teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **dino_head()},
            "student": {**{f"module.backbone.{k}": v for k, v in student.items()},
                        **{f"module.{k}": v for k, v in dino_head().items()}},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
            "epoch": 3, "args": argparse.Namespace(arch="vit_tiny", out_dim=16)}


def dinov2(teacher, student):
    """DINOv2's training checkpoint: one flat 'model' dict, networks by prefix, a mask token, two heads."""
    flat = {}
    for net, state in (("teacher", teacher), ("student", student)):
        flat.update({f"{net}.backbone.{k}": v for k, v in state.items()})
        flat[f"{net}.backbone.mask_token"] = torch.zeros(1, 64)
        flat.update({f"{net}.dino_head.{k[5:]}": v for k, v in dino_head().items()})
        flat[f"{net}.ibot_head.mlp.0.weight"] = torch.randn(8, 64)
    return {"model": flat, "iteration": 1250}


def compiled_ddp(teacher, student):
    """A plain backbone saved from torch.compile(DDP(model)): every key under module._orig_mod."""
    return {f"module._orig_mod.{k}": v for k, v in teacher.items()}


@pytest.mark.parametrize("layout, prefixes, dropped", [
    (dino, ["backbone."], {"head": 3}),
    (dinov2, ["backbone."], {"dino_head": 3, "ibot_head": 1, "mask_token": 1}),
    (compiled_ddp, ["_orig_mod.", "module."], {}),
])
def test_self_supervised_checkpoint_gives_the_source_features(tmp_path, layout, prefixes, dropped):
    teacher, student = vit_source(0), vit_source(1)
    path = tmp_path / "checkpoint.pth"
    torch.save(layout(teacher.state_dict(), student.state_dict()), path)
    model = create_backbone(spec("test_vit", checkpoint=str(path))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), teacher(x))
    record = weights_record(model)
    assert record["source"] == "checkpoint" and record["location"] == str(path) and len(record["sha256"]) == 64
    assert record["checkpoint_key"] == (None if layout is compiled_ddp else "teacher")
    assert record["prefixes"] == prefixes and record["dropped"] == dropped and record["adapted"] == {}


@pytest.mark.parametrize("layout", [dino, dinov2])
def test_the_student_on_request(tmp_path, layout):
    teacher, student = vit_source(0), vit_source(1)
    path = tmp_path / "checkpoint.pth"
    torch.save(layout(teacher.state_dict(), student.state_dict()), path)
    model = create_backbone(spec("test_vit", checkpoint=str(path), checkpoint_key="student")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), student(x)) and not torch.allclose(model(x), teacher(x))
    assert weights_record(model)["checkpoint_key"] == "student"


def test_a_network_the_file_does_not_hold(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(vit_source().state_dict(), str(path))
    with pytest.raises(ArtifactError, match=r"plain.safetensors holds no 'teacher' network .*checkpoint_key=auto"):
        create_backbone(spec("test_vit", checkpoint=str(path), checkpoint_key="teacher"))
    with pytest.raises(ConfigError, match="backbone.checkpoint_key='ema' is not allowed"):
        backbone_spec({"name": "test_vit", "checkpoint_key": "ema"})


def test_position_embeddings_follow_the_recipe(tmp_path):
    """224 px weights (14x14 patches of 16 px) on a 32 px recipe: patch 4 (auto) and an 8x8 grid. The class
    token's embedding is kept; a ramp across the patch grid stays a ramp (rows and columns not swapped)."""
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    state = source.state_dict()
    pos = state["pos_embed"].clone()  # (1, 1 + 14 * 14, 192)
    cols = torch.arange(14.0).repeat(14)  # column of each patch, row-major
    pos[0, 1:, 0], pos[0, 1:, 1] = cols, cols.view(14, 14).T.reshape(-1)
    state["pos_embed"] = pos
    path = tmp_path / "vit224.safetensors"
    save_file(state, str(path))
    model = create_backbone(spec(checkpoint=str(path)))
    assert weights_record(model)["adapted"] == {"pos_embed": "14x14 -> 8x8", "patch_size": "16x16 -> 4x4"}
    new = model.pos_embed.detach()
    assert new.shape == (1, 1 + 8 * 8, 192)
    assert torch.equal(new[0, 0], pos[0, 0])
    grid = new[0, 1:, 0].view(8, 8)  # the column ramp: rising along x, constant along y
    assert (grid[:, 1:] > grid[:, :-1]).all() and grid.std(dim=0).max() < 1e-4
    assert torch.allclose(new[0, 1:, 1].view(8, 8), grid.T, atol=1e-5)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


def test_position_embeddings_keep_the_patch_size_when_asked(tmp_path):
    path = tmp_path / "vit160.safetensors"  # timm's test ViT: 160 px, 10x10 patches of 16 px
    save_file(timm.create_model("test_vit", num_classes=0).state_dict(), str(path))
    model = create_backbone(spec("test_vit", checkpoint=str(path), img_size=[64, 64], patch_size=16))
    assert weights_record(model)["adapted"] == {"pos_embed": "10x10 -> 4x4"}
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 64)


def rgb_resnet(tmp_path):
    source = timm.create_model("test_resnet", num_classes=0).eval()
    path = tmp_path / "rgb.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    return source, path


def test_rgb_weights_on_grey_images(tmp_path):
    """Summed first-layer weights: a grey image gives exactly what the RGB model gives for it in grey."""
    source, path = rgb_resnet(tmp_path)
    model = create_backbone(spec("test_resnet", checkpoint=str(path), in_chans=1)).eval()
    assert weights_record(model)["adapted"] == {"in_chans": "3 -> 1 (summed)"}
    grey = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(grey), source(grey.expand(-1, 3, -1, -1)), atol=1e-5)


def test_rgb_weights_on_13_bands(tmp_path):
    source, path = rgb_resnet(tmp_path)
    model = create_backbone(spec("test_resnet", checkpoint=str(path), in_chans=13)).eval()
    assert weights_record(model)["adapted"] == {"in_chans": "3 -> 13 (RGB repeated, scaled by 3/13)"}
    rgb, bands = source.conv1[0].weight.detach(), model.conv1[0].weight.detach()
    assert bands.shape[1] == 13
    assert torch.allclose(bands, rgb.repeat(1, 5, 1, 1)[:, :13] * 3 / 13)
    assert model(torch.rand(2, 13, 32, 32)).shape == (2, 96)


@pytest.mark.parametrize("have, want", [(13, 3), (1, 3), (4, 13)])
def test_channels_that_cannot_be_adapted(tmp_path, have, want):
    path = tmp_path / f"bands{have}.pt"
    torch.save(timm.create_model("test_resnet", num_classes=0, in_chans=have).state_dict(), path)
    with pytest.raises(ConfigError, match=rf"bands{have}.pt: the first layer conv1.0.weight takes {have} channel"
                                          rf"\(s\) but the data has {want} .*only 3-channel \(RGB\) weights"):
        create_backbone(spec("test_resnet", checkpoint=str(path), in_chans=want))


def test_a_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(path))
    with pytest.raises(ArtifactError) as error:
        create_backbone(spec(checkpoint=str(path)))
    message = str(error.value)
    assert "\n" not in message and f"{path} does not fit backbone 'vit_tiny_patch16_224'" in message
    assert "missing (e.g. [" in message and "unexpected (e.g. ['bn1.bias'" in message
    assert "its keys are those of a resnet but 'vit_tiny_patch16_224' is a vit" in message


def test_a_prefix_that_is_not_removed_is_named(tmp_path):
    path = tmp_path / "encoder.pt"
    torch.save({f"encoder.{k}": v for k, v in vit_source().state_dict().items()}, path)
    with pytest.raises(ArtifactError, match=r"encoder.pt does not fit .*a prefix 'encoder.' that is not removed"):
        create_backbone(spec("test_vit", checkpoint=str(path)))


def test_pretrained_and_checkpoint_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="backbone.pretrained=true and backbone.checkpoint=.* both name weights"):
        spec(pretrained=True, checkpoint=str(tmp_path / "w.pt"))


def test_timm_pretrained_weights_are_fitted_and_recorded(tmp_path):
    """backbone.pretrained=true through timm's loader (a local file named by pretrained_cfg_overlay stands in
    for the hub): the weights are fitted to the 32 px grey recipe like a checkpoint's, and recorded."""
    source = timm.create_model("test_vit", num_classes=0)
    path = tmp_path / "hub.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_backbone(spec("test_vit", in_chans=1, pretrained=True,
                                 kwargs={"pretrained_cfg_overlay": {"file": str(path)}}))
    record = weights_record(model)
    assert record["source"] == "timm" and record["location"] == str(path)
    assert record["adapted"] == {"pos_embed": "10x10 -> 8x8", "in_chans": "3 -> 1 (summed)",
                                 "patch_size": "16x16 -> 4x4"}
    assert torch.equal(model.cls_token, source.cls_token)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """The hub switched off (as HF_HUB_OFFLINE=1 does) with an empty cache; any socket lookup fails the test
    at once instead of waiting on a timeout."""
    import huggingface_hub.constants as hf

    tries = []

    def refuse(*args, **kwargs):
        tries.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    yield
    assert not tries, f"something reached for the network: {tries[:2]}"


@pytest.mark.parametrize("name", ["hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "test_resnet"])
def test_hub_weights_without_internet_are_one_clear_line(no_network, name):
    started = time.perf_counter()
    with pytest.raises(ArtifactError) as error:
        create_backbone(spec(name, pretrained=True))
    message = str(error.value)
    assert "\n" not in message and f"cannot download the weights of {name!r} (no internet connection" in message
    assert "backbone.checkpoint=<file>" in message
    assert time.perf_counter() - started < 30


def test_pretrain_fails_on_unreachable_hub_weights_before_reading_the_data(no_network, monkeypatch, tmp_path):
    """A user without the hub learns it in seconds, not after the data scan of a large recipe."""
    from fmtransfer.data.datamodule import RecipeDataModule
    from fmtransfer.tasks.pretrain import pretrain
    from tests.conftest import make_cfg

    scanned = []
    monkeypatch.setattr(RecipeDataModule, "prepare", lambda self: scanned.append(1))
    with pytest.raises(ArtifactError, match="cannot download the weights of 'test_resnet'"):
        pretrain(make_cfg("pretrain", ["experiment=smoke", "backbone.name=test_resnet", "backbone.pretrained=true"],
                          tmp_path / "run"))
    assert not scanned


def test_an_unknown_hub_id_is_one_clear_line(monkeypatch):
    import httpx
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(name, **kwargs):
        url = f"https://huggingface.co/{name.split(':', 1)[1]}/resolve/main/config.json"
        raise RepositoryNotFoundError(f"404 Client Error. Repository Not Found for url: {url}.\nMore text",
                                      response=httpx.Response(404, request=httpx.Request("GET", url)))

    monkeypatch.setattr(timm, "create_model", not_found)
    with pytest.raises(ArtifactError, match=r"^backbone.name='hf-hub:nobody/no-such-model': the hub has no such "
                                            r"model, or it is private or gated .*Repository Not Found[^\n]*$"):
        create_backbone(spec("hf-hub:nobody/no-such-model", pretrained=True))
    assert "timm has no pretrained weights for 'x'" in hub_error("x", RuntimeError("No pretrained weights exist"))
