"""JEPA's pieces on their own: settings, token grids, target-block masks, input masking, and a tiny module run in
which the loss falls while the teacher (BatchNorm statistics included) stays as it was."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from fmtransfer.config import build_dataclass
from fmtransfer.errors import ConfigError
from fmtransfer.models.jepa import (
    JepaModule,
    JepaSettings,
    MaskSettings,
    mask_input,
    sample_block_masks,
    token_grid,
    tokens,
)
from tests.conftest import make_cfg


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> dict:
    """The shipped defaults (configs/method/jepa.yaml), as a plain dict."""
    from omegaconf import OmegaConf

    cfg = make_cfg("pretrain", ["method=jepa"], tmp_path_factory.mktemp("cfg"))
    return OmegaConf.to_container(cfg.method.jepa, resolve=True)


def _settings(node: dict, **mask) -> JepaSettings:
    return build_dataclass(JepaSettings, {**node, "mask": {**node["mask"], **mask}}, "method.jepa")


def _vit(size: int = 28):
    return timm.create_model("test_vit", num_classes=0, in_chans=1, img_size=size, patch_size=4)


def test_defaults_build_and_need_a_teacher(node):
    settings = _settings(node)
    assert settings.teacher is None and settings.init == "teacher" and settings.mask.blocks >= 1


@pytest.mark.parametrize(("change", "message"), [
    ({"mask": {"max_ratio": 1.0}}, r"method\.jepa\.mask\.max_ratio=1\.0 must be in \(0, 1\)"),
    ({"mask": {"block_scale": [0.1, 0.7]}}, r"method\.jepa\.mask\.block_scale=\[0\.1, 0\.7\].*max_ratio=0\.6"),
    ({"mask": {"aspect_ratio": [2.0, 1.0]}}, r"method\.jepa\.mask\.aspect_ratio=\[2\.0, 1\.0\]"),
    ({"mask": {"blocks": 0}}, r"method\.jepa\.mask\.blocks=0 must be >= 1"),
    ({"predictor": {"width": 100, "heads": 3}}, r"method\.jepa\.predictor\.width=100 must be a multiple of "
                                                r"method\.jepa\.predictor\.heads=3"),
    ({"init": "imagenet"}, r"method\.jepa\.init='imagenet'"),
    ({"loss": "l1"}, r"method\.jepa\.loss='l1'"),
    ({"clip_grad": -1.0}, r"method\.jepa\.clip_grad=-1\.0 must be >= 0"),
])
def test_bad_settings_name_the_key(node, change, message):
    values = copy.deepcopy(node)
    for key, value in change.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=message):
        build_dataclass(JepaSettings, values, "method.jepa")


def test_token_grids_of_a_vit_and_a_cnn():
    vit = _vit()
    assert token_grid(vit, [28, 28], 1) == (7, 7)
    x = torch.randn(2, 1, 28, 28)
    assert tokens(vit, x).shape == (2, 49, vit.num_features)  # the class token left out
    torch.testing.assert_close(tokens(vit.eval(), x), vit.forward_features(x)[:, vit.num_prefix_tokens:])
    cnn = timm.create_model("test_resnet", num_classes=0, in_chans=1).eval()
    assert token_grid(cnn, [28, 28], 1) == (1, 1)  # what the stage refuses
    assert token_grid(cnn, [64, 96], 1) == (2, 3)
    x = torch.randn(2, 1, 64, 96)
    feature_map = cnn.forward_features(x)
    got = tokens(cnn, x)
    assert got.shape == (2, 6, cnn.num_features)
    torch.testing.assert_close(got[:, 1 * 3 + 2], feature_map[:, :, 1, 2])  # row-major positions


def test_block_masks_have_the_shape_and_share_asked_for(node):
    settings = _settings(node).mask
    masks = sample_block_masks(500, (7, 7), settings, torch.Generator().manual_seed(0))
    assert masks.shape == (500, 49) and masks.dtype == torch.bool
    share = masks.float().mean(1)
    assert share.min() > 0 and share.max() <= settings.max_ratio  # something to predict, something to see
    # several blocks of 10-20 % each: well above one block's share on average, below the cap
    assert 0.3 < share.mean() < settings.max_ratio
    again = sample_block_masks(500, (7, 7), settings, torch.Generator().manual_seed(0))
    other = sample_block_masks(500, (7, 7), settings, torch.Generator().manual_seed(1))
    assert torch.equal(masks, again) and not torch.equal(masks, other)
    assert len({tuple(m.tolist()) for m in masks}) > 400  # drawn per image, not one mask per batch


def test_one_block_is_a_rectangle_of_the_asked_scale(node):
    settings = _settings(node, blocks=1, block_scale=[0.2, 0.2], aspect_ratio=[1.0, 1.0]).mask
    masks = sample_block_masks(200, (14, 14), settings, torch.Generator().manual_seed(0)).view(200, 14, 14)
    for m in masks:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(m.sum()) == int(box) == 36  # round(sqrt(0.2 * 196)) = 6: a 6x6 square
    tops = {int(m.any(1).nonzero().min()) for m in masks}
    assert len(tops) > 5  # placed anywhere on the grid


def test_a_tiny_grid_keeps_something_visible(node):
    settings = _settings(node, blocks=4, block_scale=[0.5, 0.5], max_ratio=0.5).mask
    masks = sample_block_masks(100, (2, 2), settings, torch.Generator().manual_seed(0))
    share = masks.float().mean(1)
    assert share.min() > 0 and share.max() <= 0.5


def test_mask_input_blanks_exactly_the_masked_patches():
    x = torch.randn(2, 1, 28, 28)
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[0, 1 * 7 + 3] = True  # row 1, column 3: pixels 4-7 x 12-15
    masked = mask_input(x, mask, (7, 7))
    assert torch.all(masked[0, 0, 4:8, 12:16] == 0)
    keep = torch.ones(28, 28, dtype=torch.bool)
    keep[4:8, 12:16] = False
    torch.testing.assert_close(masked[0, 0][keep], x[0, 0][keep])
    torch.testing.assert_close(masked[1], x[1])


def _fit(module: JepaModule, images: torch.Tensor, epochs: int) -> pl.Trainer:
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images))), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    return trainer


def _images(n: int, size: int) -> torch.Tensor:
    """Smooth images (a few random low-frequency waves): their parts tell about the rest."""
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    freq, phase = torch.rand(n, 2, generator=g) * 6 + 1, torch.rand(n, 1, 1, generator=g) * 6
    waves = torch.sin(freq[:, :1, None] * yy * 3 + phase) * torch.cos(freq[:, 1:, None] * xx * 3)
    return waves[:, None]  # (n, 1, size, size)


def test_loss_falls_and_the_teacher_stays_frozen(node):
    pl.seed_everything(0, verbose=False)
    teacher = _vit()
    student = copy.deepcopy(teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = JepaModule(student, teacher, _settings(node), (7, 7),
                        lambda params: torch.optim.AdamW(params, lr=1e-3), seed=0)
    _fit(module, _images(64, 28), epochs=6)
    losses = [e["loss"] for e in module.history]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not all(torch.equal(v, before[k]) for k, v in student.state_dict().items())  # the student learned
    assert not any(p.requires_grad for p in teacher.parameters())


def test_a_batchnorm_teacher_keeps_its_statistics(node):
    """A teacher handed over in train mode, or switched to it with the whole module (as older Lightning did at fit
    start), must stay in eval mode: in train mode its BatchNorm would overwrite the statistics it was trained with."""
    pl.seed_everything(0, verbose=False)
    teacher = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    with torch.no_grad():  # statistics of some data, as a trained teacher has; left in train mode
        teacher.train()(torch.randn(32, 1, 64, 64))
    student = copy.deepcopy(teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = JepaModule(student, teacher, _settings(node, block_scale=[0.25, 0.25], max_ratio=0.5), (2, 2),
                        lambda params: torch.optim.AdamW(params, lr=1e-3), seed=0)
    _fit(module, torch.randn(32, 1, 64, 64) * 2 + 1, epochs=1)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    module.train()
    assert not teacher.training and student.training


def test_the_student_sees_the_masked_image_and_the_teacher_the_whole(node):
    module = JepaModule(_vit(), _vit(), _settings(node), (7, 7), torch.optim.AdamW, seed=0)
    seen = {}
    for name in ("student", "teacher"):
        getattr(module, name).patch_embed.register_forward_pre_hook(
            lambda _, args, name=name: seen.__setitem__(name, args[0].clone()))
    x = _images(4, 28)
    module._generator.manual_seed(5)
    with pytest.warns(UserWarning, match="self.log"):  # no trainer here: the step's logging is skipped
        loss = module.training_step((x, torch.zeros(4)), 0)
    mask = sample_block_masks(4, (7, 7), module.settings.mask, torch.Generator().manual_seed(5))
    assert mask.any() and torch.isfinite(loss)
    torch.testing.assert_close(seen["teacher"], x)
    torch.testing.assert_close(seen["student"], mask_input(x, mask, (7, 7)))
    assert not torch.equal(seen["student"], x)


def test_a_student_sharing_the_teachers_tensors_is_refused(node):
    teacher = _vit()
    with pytest.raises(ConfigError, match="shares tensors with the frozen teacher"):
        JepaModule(teacher, teacher, _settings(node), (7, 7), torch.optim.AdamW)


def test_mask_settings_dataclass_rejects_a_block_larger_than_the_cap():
    with pytest.raises(ConfigError, match="block_scale"):
        MaskSettings(blocks=1, block_scale=[0.5, 0.9], aspect_ratio=[1.0, 1.0], max_ratio=0.6)
