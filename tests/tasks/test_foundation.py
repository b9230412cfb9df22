"""Foundation weights through the stages: pretrain from a brought checkpoint records what it adapted in
metrics.json and model.json; a checkpoint that does not fit stops the run before training with one line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import timm
import torch

from fmtransfer.models import load_model
from tests.conftest import ROOT, cli_env
from tests.fixtures import make_npz


def dino_checkpoint(path, name, **kwargs):
    """A DINO-style teacher/student checkpoint of timm's ``name`` (RGB, its default size), heads included."""
    state = timm.create_model(name, num_classes=0, **kwargs).state_dict()
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, "head.last_layer.weight": torch.ones(4, 2)},
                "student": {f"module.backbone.{k}": v for k, v in state.items()},
                "epoch": 10, "args": argparse.Namespace(arch=name)}, path)
    return path, state


@pytest.mark.slow
def test_pretrain_from_a_dino_checkpoint_on_13_bands(cfg_factory, tmp_path):
    """RGB ViT weights saved at 160 px onto a 13-band, 16 px recipe: pos_embed, patch size and channels adapted,
    recorded in metrics.json and model.json; the saved model reloads without the checkpoint."""
    from fmtransfer.tasks.pretrain import pretrain

    path, _ = dino_checkpoint(tmp_path / "dino.pth", "test_vit")
    data = make_npz(tmp_path / "bands.npz", n=60, size=16, channels=13)
    result = pretrain(cfg_factory("pretrain", "experiment=smoke", "backbone=tiny_vit", f"backbone.checkpoint={path}",
                                  "data=npz", f"data.source.path={data}", "data.channels=13",
                                  "data.image_size=[16,16]", "data.limit=null"))
    adapted = {"pos_embed": "10x10 -> 8x8", "in_chans": "3 -> 13 (RGB repeated, scaled by 3/13)",
               "patch_size": "16x16 -> 2x2"}
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    record = metrics["backbone_weights"]
    assert record["source"] == "checkpoint" and record["location"] == str(path)
    assert record["checkpoint_key"] == "teacher" and record["dropped"] == {"head": 1}
    assert record["adapted"] == adapted
    model, meta = load_model(result.run_dir)
    assert meta["backbone_weights"] == record
    assert model.backbone.patch_embed.proj.weight.shape[1:] == (13, 2, 2)
    assert torch.isfinite(model(torch.rand(2, 13, 16, 16))).all()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmtransfer", *args], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


@pytest.mark.e2e
def test_cli_pretrain_from_rgb_weights_on_grey_digits(tmp_path):
    path = tmp_path / "rgb_resnet.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(path))
    proc = cli("pretrain", "experiment=smoke", "data=uci_digits_region", f"backbone.checkpoint={path}",
               f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["backbone_weights"]["adapted"] == {"in_chans": "3 -> 1 (summed)"}
    assert json.loads((tmp_path / "run" / "model.json").read_text())["backbone_weights"] == metrics["backbone_weights"]


@pytest.mark.e2e
def test_cli_a_checkpoint_of_another_architecture_stops_before_training(tmp_path):
    path, _ = dino_checkpoint(tmp_path / "vit.pth", "test_vit")
    proc = cli("pretrain", "experiment=smoke", "data=uci_digits_region", f"backbone.checkpoint={path}",
               f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and f"{path} does not fit backbone 'test_resnet'" in lines[0]
    assert "its keys are those of a vit but 'test_resnet' is a resnet" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "model.json").exists()
