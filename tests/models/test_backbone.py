"""The backbone factory: any timm name, channels and sizes, local and hub-style weights, safe loading."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.models.backbone import BackboneSpec, check_input_size, create_backbone
from fmtransfer.models.families import auto_patch_size, family_of


def spec(name="test_resnet", **kw):
    return BackboneSpec(name=name, **{"in_chans": 1, "img_size": [28, 28], **kw})


@pytest.mark.parametrize("name, dim", [("test_resnet", 96), ("test_vit", 64), ("resnet10t", 512)])
def test_features_and_embed_dim(name, dim):
    model = create_backbone(spec(name))
    assert model.num_features == dim
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, dim)


def test_vit_takes_img_size_and_auto_patch():
    model = create_backbone(spec("test_vit", img_size=[32, 32]))
    assert model.patch_embed.patch_size == (4, 4) and model.patch_embed.grid_size == (8, 8)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 64)
    assert auto_patch_size((224, 224)) == 16 and auto_patch_size((28, 28)) == 4 and auto_patch_size((64, 64)) == 8


def test_family_table():
    assert family_of("vit_small_patch16_224").name == "vit"
    assert family_of("resnet18").name == "resnet"
    assert family_of("convnext_atto").name == "convnext"
    assert family_of("some_new_net").name == "generic"


def test_unknown_model_name_is_clear():
    with pytest.raises(ConfigError, match="backbone.name='resnet_eighteen' is not a timm model"):
        spec("resnet_eighteen")


def _plain_state(tmp_path, in_chans=1):
    state = timm.create_model("test_resnet", num_classes=5, in_chans=in_chans).state_dict()
    first = next(k for k, v in state.items() if v.ndim == 4)
    state[first] = torch.full_like(state[first], 0.123)  # not what a fresh model would have
    return state


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_loads(tmp_path, suffix):
    state = _plain_state(tmp_path)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": state}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = create_backbone(spec(checkpoint=str(path)))
    key = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
    assert torch.equal(model.state_dict()[key], state[key])  # head weights were dropped, backbone loaded


def test_checkpoint_shape_mismatch_names_the_file(tmp_path):
    """Weights of the same architecture at another width: the file, a key, both shapes and the likely cause."""
    path = tmp_path / "narrow.pt"
    torch.save(timm.create_model("test_vit", num_classes=0, in_chans=1, embed_dim=32).state_dict(), path)
    with pytest.raises(ArtifactError, match=r"narrow.pt: .* has shape .* expects .*another width"):
        create_backbone(spec("test_vit", checkpoint=str(path), patch_size=None))


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "vit.pt"
    torch.save(timm.create_model("test_vit", num_classes=0, in_chans=1).state_dict(), path)
    with pytest.raises(ArtifactError, match="architecture"):
        create_backbone(spec(checkpoint=str(path)))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(ArtifactError, match="weights_only=True"):
        create_backbone(spec(checkpoint=str(path)))


def test_missing_or_truncated_checkpoint(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        create_backbone(spec(checkpoint=str(tmp_path / "none.pt")))
    path = tmp_path / "cut.safetensors"
    save_file({k: v.contiguous() for k, v in _plain_state(tmp_path).items()}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="cut.safetensors"):
        create_backbone(spec(checkpoint=str(path)))


def test_pretrained_goes_through_timms_loader(tmp_path):
    """pretrained=true uses timm's hub loading; a local file through pretrained_cfg_overlay exercises that path
    here (no hub), including timm's adaptation of RGB weights to a 1-channel input."""
    src = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / "hub_weights.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = create_backbone(spec(pretrained=True, kwargs={"pretrained_cfg_overlay": {"file": str(path)}}))
    first = next(k for k, v in src.state_dict().items() if v.ndim == 4)
    assert torch.allclose(model.state_dict()[first], src.state_dict()[first].sum(1, keepdim=True))


def test_input_too_small_for_the_family_suggests_a_size():
    s = BackboneSpec(name="convnext_atto", in_chans=1, img_size=[28, 28])
    with pytest.raises(ConfigError, match=r"'convnext_atto' cannot take 28x28 images; set data.image_size=\[32,32\]"):
        check_input_size(create_backbone(s), s, [28, 28], 1)
    s = spec("test_resnet")
    check_input_size(create_backbone(s), s, [28, 28], 1)  # fine: no error
