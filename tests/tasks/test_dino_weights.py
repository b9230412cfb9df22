"""``pretrain method=dino`` from brought weights: loaded once, and recorded in metrics.json as in model.json."""

from __future__ import annotations

import json

import pytest

import fmtransfer.models.backbone as backbone_module
from fmtransfer.models import load_model
from fmtransfer.tasks.pretrain import pretrain
from tests.fixtures import make_npz
from tests.tasks.test_foundation import dino_checkpoint


@pytest.mark.slow
def test_dino_from_a_checkpoint_loads_it_once_and_records_it(cfg_factory, tmp_path, monkeypatch):
    path, _ = dino_checkpoint(tmp_path / "dino.pth", "test_vit")
    data = make_npz(tmp_path / "rgb.npz", n=60, size=16, channels=3)
    loads = []
    real = backbone_module.load_backbone_weights
    monkeypatch.setattr(backbone_module, "load_backbone_weights",
                        lambda *a, **kw: loads.append(a[1]) or real(*a, **kw))
    # a ViT with local views: the student takes crops of two sizes (dynamic_img_size)
    result = pretrain(cfg_factory("pretrain", "experiment=smoke", "method=dino", "loader.batch_size=16",
                                  "backbone=tiny_vit", f"backbone.checkpoint={path}", "method.dino.crops.n_local=2",
                                  "data=npz", f"data.source.path={data}", "data.channels=3",
                                  "data.image_size=[16,16]", "data.limit=null"))
    assert [str(p) for p in loads] == [str(path)]
    record = json.loads((result.run_dir / "metrics.json").read_text())["backbone_weights"]
    assert record["source"] == "checkpoint" and record["location"] == str(path)
    assert record["adapted"]["pos_embed"] == "10x10 -> 8x8"
    assert load_model(result.run_dir)[1]["backbone_weights"] == record
