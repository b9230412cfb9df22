"""DINO's pieces on their own: multi-crop views, crop plans, the loss and its signals, the collapse guard, the
teacher copy, kNN and linear probes; and a run forced to collapse, stopped within its first epoch."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fmtransfer.config import build_dataclass
from fmtransfer.data.multicrop import MultiCrop
from fmtransfer.errors import ConfigError
from fmtransfer.models.dino import (
    CollapseError,
    CollapseGuard,
    CollapseSettings,
    CropSettings,
    DinoLoss,
    DinoModule,
    DinoSettings,
    check_separate,
    embedding_std,
    plan_crops,
)
from fmtransfer.models.probes import knn_loo_accuracy, knn_scores, linear_probe_scores
from tests.conftest import make_cfg


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> DinoSettings:
    """The shipped defaults (configs/method/dino.yaml)."""
    cfg = make_cfg("pretrain", ["method=dino"], tmp_path_factory.mktemp("cfg"))
    return build_dataclass(DinoSettings, cfg.method.dino, "method.dino")


def _crops(**overrides) -> CropSettings:
    values = {"n_local": 6, "global_size": "auto", "local_size": "auto", "global_scale": "auto",
              "local_scale": [0.05, 0.4], "hflip": 0.0, "brightness": 0.4, "contrast": 0.4, **overrides}
    return CropSettings(**values)


def test_multicrop_views_shapes_and_seeded():
    crop = MultiCrop((28, 28), (12, 12), 4, (0.4, 1.0), (0.05, 0.4), hflip=0.5)
    x = torch.randn(5, 3, 28, 28)
    views = crop(x, generator=torch.Generator().manual_seed(1))
    assert [tuple(v.shape) for v in views] == [(5, 3, 28, 28)] * 2 + [(5, 3, 12, 12)] * 4
    again = crop(x, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    other = crop(x, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(views[0], other[0])
    assert not torch.equal(views[0], views[1])  # two global views of one image differ


def test_crop_plan_fits_the_image_and_patch_size():
    plan = plan_crops(_crops(), [28, 28], patch=4)
    assert plan.global_size == (28, 28) and plan.local_size == (12, 12)
    assert plan.global_scale == (0.4, 1.0)
    assert plan_crops(_crops(), [224, 224], patch=16).local_size == (96, 96)  # DINO's own sizes
    assert plan_crops(_crops(n_local=0), [28, 28], patch=None).global_scale == (0.14, 1.0)
    with pytest.raises(ConfigError, match=r"local_size=13 does not fit the backbone's patch size 4.*12 or 16"):
        plan_crops(_crops(local_size=13), [28, 28], patch=4)
    with pytest.raises(ConfigError, match="larger than the global views"):
        plan_crops(_crops(local_size=32), [28, 28], patch=4)


def test_auto_local_views_only_where_a_local_view_keeps_content():
    """n_local=auto: DINO's six local views from 75 px images up (a local view of 32 px or more), none on 28 px
    digits (12 px views); an explicit count or local_size is the user's."""
    auto = _crops(n_local="auto")
    assert plan_crops(auto, [28, 28], patch=None).n_local == 0
    assert plan_crops(auto, [28, 28], patch=None).global_scale == (0.14, 1.0)  # the authors' scale without locals
    assert plan_crops(auto, [224, 224], patch=16).n_local == 6 and plan_crops(auto, [75, 80], patch=None).n_local == 6
    assert plan_crops(auto, [74, 74], patch=None).n_local == 0
    assert plan_crops(_crops(n_local="auto", local_size=12), [28, 28], patch=None).n_local == 0
    assert plan_crops(_crops(n_local=2), [28, 28], patch=None).n_local == 2
    with pytest.raises(ConfigError, match="n_local='some'"):
        _crops(n_local="some")


def test_loss_of_a_uniform_teacher_is_ln_k():
    k = 64
    loss_fn = DinoLoss(k, student_temp=0.1, center_momentum=0.9)
    student = [torch.zeros(8, k) for _ in range(4)]
    teacher = [torch.zeros(8, k) for _ in range(2)]
    loss, signals = loss_fn(student, teacher, teacher_temp=0.04)
    assert loss.item() == pytest.approx(math.log(k), rel=1e-5)
    assert signals["teacher_entropy"] == pytest.approx(math.log(k), rel=1e-5)
    assert signals["kl"] == pytest.approx(0.0, abs=1e-4)


def test_centre_follows_the_teacher_with_momentum():
    loss_fn = DinoLoss(4, student_temp=0.1, center_momentum=0.9)
    loss_fn.update_center(torch.tensor([[1.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]))
    assert loss_fn.center[0, 0].item() == pytest.approx(0.2)  # 0.9 * 0 + 0.1 * mean(1, 3)


def test_schedules(settings):
    assert settings.momentum(0.0) == pytest.approx(settings.momentum_start)
    assert settings.momentum(1.0) == pytest.approx(settings.momentum_end)
    assert settings.teacher_temperature(0.0) == pytest.approx(settings.teacher_temp_start)
    assert settings.teacher_temperature(settings.teacher_temp_warmup) == pytest.approx(settings.teacher_temp)


def _signals(**overrides):
    return {"loss": 3.0, "teacher_entropy": 2.0, "teacher_mean_entropy": 5.0, "kl": 1.0, "embedding_std": 0.1,
            **overrides}


def test_guard_stops_each_collapse_after_patience_steps():
    settings = CollapseSettings(stop=True, patience=3, max_entropy_fraction=0.98, min_loss_fraction=0.02,
                                min_std_ratio=0.05, min_prototypes_share=0.5)
    cases = {"uniform": _signals(loss=math.log(64), teacher_entropy=math.log(64)),
             "constant": _signals(loss=0.001, teacher_entropy=0.0, kl=0.0),
             "embedding": _signals(embedding_std=1e-6)}
    advice = {"uniform": "method.dino.teacher_temp", "constant": "method.dino.center_momentum",
              "embedding": "method.optimizer.lr"}
    for name, signals in cases.items():
        guard = CollapseGuard(settings, prototypes=64, embed_dim=100)
        guard.step(_signals(), "step 1")  # a healthy step resets nothing yet
        guard.step(signals, "step 2")
        guard.step(signals, "step 3")
        with pytest.raises(CollapseError, match=advice[name]) as caught:
            guard.step(signals, "step 4")
        assert caught.value.signal == name


def test_guard_lets_a_healthy_run_go_and_stops_a_short_collapsed_epoch():
    settings = CollapseSettings(stop=True, patience=20, max_entropy_fraction=0.98, min_loss_fraction=0.02,
                                min_std_ratio=0.05, min_prototypes_share=0.5)
    guard = CollapseGuard(settings, prototypes=64, embed_dim=100)
    for _ in range(50):
        guard.step(_signals(), "a step")
    guard.end_epoch(_signals(), "the end of epoch 1")
    uniform = _signals(loss=math.log(64), teacher_entropy=math.log(64))
    for _ in range(3):  # fewer steps than the patience, but all of the epoch
        guard.step(uniform, "a step")
    with pytest.raises(CollapseError, match="every step of the epoch"):
        guard.end_epoch(uniform, "the end of epoch 2")


def _guard(prototypes: int = 64, crops: MultiCrop | None = None, share: float = 0.5) -> CollapseGuard:
    settings = CollapseSettings(stop=True, patience=1, max_entropy_fraction=0.98, min_loss_fraction=0.02,
                                min_std_ratio=0.05, min_prototypes_share=share)
    return CollapseGuard(settings, prototypes=prototypes, embed_dim=100, crops=crops)


def test_the_embedding_advice_adds_local_views_only_where_they_keep_enough_pixels():
    """At 28 px a local view is 12 px, and six of them kept DINO from learning: the advice must not ask for them."""
    def advice(side: int, n_local: int) -> str:
        crops = MultiCrop((side, side), (round(side * 3 / 7),) * 2, n_local, (0.14, 1.0), (0.05, 0.4))
        with pytest.raises(CollapseError) as caught:
            _guard(crops=crops).step(_signals(embedding_std=1e-6), "step 1")
        assert caught.value.signal == "embedding" and "method.optimizer.lr" in str(caught.value)
        return str(caught.value)

    small = advice(28, 0)
    assert "n_local=6" not in small and "keep method.dino.crops.n_local=0" in small and "12 px" in small
    assert "drop the local views (method.dino.crops.n_local=0)" in advice(28, 6)
    assert "add local views (method.dino.crops.n_local=6" in advice(96, 0)
    assert "method.dino.crops.local_scale" in advice(224, 6)


def test_the_guard_warns_about_a_partial_collapse_against_what_a_batch_could_reach():
    """24 of 256 prototypes at batch 32 (64 teacher outputs) is the partial collapse a helper's run showed without
    tripping the guard; a batch cannot use more prototypes than it has sharp teacher outputs."""
    partial = {"prototypes_in_use": 24.0, "prototypes_reachable": 64.0, "teacher_outputs": 64.0}
    message = _guard(prototypes=256).spread(partial, "the end of epoch 9")
    assert message and "24.0 prototypes" in message and "of the 64 it could reach" in message
    assert "method.dino.collapse.min_prototypes_share" in message and "method.dino.teacher_temp" in message
    assert _guard(prototypes=256).spread({**partial, "prototypes_in_use": 50.0}, "epoch 9") is None
    assert _guard(prototypes=256, share=0.0).spread(partial, "epoch 9") is None


class _TwoClusters(nn.Module):
    """A backbone that maps every image to one of two embeddings: a teacher can use two prototypes at most."""

    num_features = 16

    def __init__(self):
        super().__init__()
        self.direction = nn.Parameter(torch.randn(16))

    def forward(self, x):
        side = torch.where(x.flatten(1).mean(1, keepdim=True) > 0, 1.0, -1.0)
        return side * self.direction + torch.randn(16, generator=torch.Generator().manual_seed(3))


def test_a_run_forced_into_a_partial_collapse_warns_and_goes_on(settings, caplog):
    sharp = dataclasses.replace(settings, prototypes=64, teacher_temp_start=0.001, teacher_temp=0.001)
    loader = DataLoader(TensorDataset(torch.randn(64, 1, 16, 16), torch.zeros(64), torch.arange(64)), batch_size=16)
    crops = plan_crops(sharp.crops, [16, 16], None).build(sharp.crops)
    module = DinoModule(_TwoClusters(), sharp, crops, lambda p: torch.optim.AdamW(p, lr=1e-3))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.WARNING, logger="fmtransfer.models.dino"):
        trainer.fit(module, train_dataloaders=loader)  # the guard does not stop it
    assert [r["epoch"] for r in module.history] == [1, 2]
    for record in module.history:
        assert record["prototypes_reachable"] == 32  # min(64 prototypes, 2 views x 16 images)
        assert record["prototypes_in_use"] < 3 and record["partial_collapse"] is True
    assert caplog.text.count("a partial collapse, which does not stop the run") == 2
    assert "method.dino.collapse.min_prototypes_share" in caplog.text


def test_a_teacher_sharing_the_students_tensors_is_refused():
    student = nn.Linear(3, 3)
    with pytest.raises(ConfigError, match="separate EMA copy"):
        check_separate(student, student)
    wrapper = nn.Sequential(student)
    with pytest.raises(ConfigError, match="shares tensors"):
        check_separate(student, wrapper)


def test_embedding_std():
    assert embedding_std(torch.ones(16, 8)) == 0.0
    healthy = embedding_std(torch.randn(4096, 64))
    assert healthy == pytest.approx(1 / math.sqrt(64), rel=0.05)


class _Constant(nn.Module):
    """A backbone that gives every image the same embedding: a collapse forced from the first step."""

    num_features = 16

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(16))

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1) + 0 * x.mean()


def test_a_run_forced_to_collapse_stops_within_its_first_epoch(settings):
    loader = DataLoader(TensorDataset(torch.randn(64, 1, 16, 16), torch.zeros(64), torch.arange(64)), batch_size=16)
    crops = plan_crops(settings.crops, [16, 16], None).build(settings.crops)
    module = DinoModule(_Constant(), settings, crops, lambda p: torch.optim.AdamW(p, lr=1e-3))
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(CollapseError, match=r"epoch 1.*std of the L2-normalised embeddings") as caught:
        trainer.fit(module, train_dataloaders=loader)
    assert caught.value.signal == "embedding"
    assert "n_local=6" not in str(caught.value)  # 16 px images: local views would be 7 px
    assert trainer.current_epoch == 0 and len(module._steps) == 4  # all four steps of epoch 1, no more


def test_a_collapse_streak_goes_on_across_a_resume(settings):
    """A run killed one step short of the guard's patience stops at its next collapsed step after a resume."""
    crops = plan_crops(settings.crops, [16, 16], None).build(settings.crops)
    optimizer = lambda p: torch.optim.AdamW(p, lr=1e-3)  # noqa: E731
    killed = DinoModule(_Constant(), settings, crops, optimizer)
    collapsed = _signals(embedding_std=1e-6)
    for step in range(settings.collapse.patience - 1):
        killed.guard.step(collapsed, f"step {step + 1}")
    checkpoint: dict = {}
    killed.on_save_checkpoint(checkpoint)
    resumed = DinoModule(_Constant(), settings, crops, optimizer)
    resumed.on_load_checkpoint(checkpoint)
    with pytest.raises(CollapseError, match=rf"{settings.collapse.patience} steps in a row"):
        resumed.guard.step(collapsed, "the first step after the resume")


def test_knn_and_linear_probe_separate_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    labels = np.repeat(np.arange(3), 20)
    feats = centres[labels] + rng.normal(size=(60, 8))
    queries, q_labels = centres[[0, 1, 2, 2]] + rng.normal(size=(4, 8)) * 0.5, np.array([0, 1, 2, 2])
    knn = knn_scores(feats, labels, queries, 3, k=5, temperature=0.07)
    assert knn.shape == (4, 3) and (knn.argmax(1) == q_labels).all()
    probe = linear_probe_scores(feats, labels, queries, 4, seed=0)  # a class the train split lacks gets -inf
    assert (probe.argmax(1) == q_labels).all() and np.isneginf(probe[:, 3]).all()


def test_knn_leave_one_out_never_counts_a_sample_as_its_own_neighbour():
    feats = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert knn_loo_accuracy(feats, np.array([0, 0, 1, 1]), k=1) == 1.0
    # with itself as a neighbour every sample would be right; without, each pair votes for the other label
    assert knn_loo_accuracy(feats, np.array([0, 1, 0, 1]), k=1) == 0.0


def test_knn_monitor_banks_a_sample_of_every_class_from_a_table_stored_class_by_class():
    """A bank capped below the train split is a seeded sample, not the first rows (the first 30 here are all class
    0, and every val image would be called 0)."""
    from fmtransfer.models.dino import KnnMonitor, KnnSettings

    labels = torch.tensor([0] * 50 + [1] * 50)
    points = torch.stack([labels.float(), 1 - labels.float()], 1) + 0.01 * torch.randn(100, 2)
    train = TensorDataset(points, labels, torch.arange(100))
    val = TensorDataset(points[::5], labels[::5], torch.arange(20))
    monitor = KnnMonitor(lambda: DataLoader(train, batch_size=16), lambda: DataLoader(val, batch_size=16), 2,
                         KnnSettings(k=5, temperature=0.07, max_bank=30))
    assert monitor.accuracy(torch.nn.Identity(), "cpu") == 1.0


def test_the_starting_knn_measures_placeholder_batchnorm_statistics_on_a_copy():
    """A new network's BatchNorm statistics (mean 0, variance 1) are not its own: the baseline a DINO run must beat
    scores the weights with statistics measured on the bank, on a copy, and keeps statistics it was given."""
    from fmtransfer.models.dino import KnnMonitor, KnnSettings

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    # the class is the distance along a large common offset, which a cosine cannot see, and the angle is noise;
    # centred, the classes sit on either side of the mean along that offset
    along = (100 + 0.5 * labels.float())[:, None] * torch.tensor([1.0, 1.0])
    points = along + 0.05 * torch.randn(200, 1, generator=g) * torch.tensor([1.0, -1.0])
    train = TensorDataset(points[:150], labels[:150], torch.arange(150))
    val = TensorDataset(points[150:], labels[150:], torch.arange(50))
    monitor = KnnMonitor(lambda: DataLoader(train, batch_size=32), lambda: DataLoader(val, batch_size=32), 2,
                         KnnSettings(k=5, temperature=0.07, max_bank=1000))
    fresh = nn.BatchNorm1d(2, affine=False)
    assert monitor.accuracy(fresh, "cpu") < 0.75  # the placeholders: every point at the same angle, nearly
    assert monitor.starting_accuracy(fresh, "cpu") >= 0.95
    assert torch.equal(fresh.running_mean, torch.zeros(2)) and torch.equal(fresh.running_var, torch.ones(2))
    given = nn.BatchNorm1d(2, affine=False)  # statistics that came with the weights: scored as they are
    given.running_mean.fill_(100.0)
    assert monitor.starting_accuracy(given, "cpu") == monitor.accuracy(given, "cpu")
