"""Every entry config composes, alone and with every experiment and every option of every group."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fmtransfer.config import config_dir
from fmtransfer.data import load_recipe
from fmtransfer.models.backbone import backbone_spec
from tests.conftest import make_cfg

CONFIGS = config_dir()
ENTRY = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
RECIPES = sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml"))
BACKBONES = sorted(p.stem for p in (CONFIGS / "backbone").glob("*.yaml"))
# recipes that need a user's path; composing them with a placeholder path is enough
PATH_KEYS = {"image_folder": "data.source.root=/x", "csv_manifest": "data.source.path=/x.csv",
             "npz": "data.source.path=/x.npz"}


def test_entry_configs_exist():
    assert {"pretrain", "evaluate", "pipeline"} <= set(ENTRY)


@pytest.mark.parametrize("stage", ENTRY)
def test_entry_config_composes(stage, tmp_path):
    cfg = make_cfg(stage, ["model=/some/run"] if stage == "evaluate" else [], tmp_path)
    assert cfg.stage == stage
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("stage", ["pretrain", "pipeline"])
def test_experiments_compose(stage, experiment, tmp_path):
    cfg = make_cfg(stage, [f"experiment={experiment}"], tmp_path)
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_validates(recipe, tmp_path):
    extra = [PATH_KEYS[recipe]] if recipe in PATH_KEYS else []
    cfg = make_cfg("pretrain", [f"data={recipe}", *extra], tmp_path)
    r = load_recipe(cfg.data)
    assert r.name == recipe
    assert cfg.backbone.in_chans == r.channels  # one source of truth for channels


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_config_validates(backbone, tmp_path):
    cfg = make_cfg("pretrain", [f"backbone={backbone}"], tmp_path)
    spec = backbone_spec(cfg.backbone)
    assert spec.in_chans == cfg.data.channels


@pytest.mark.parametrize("group", ["trainer", "logger", "method", "loader"])
def test_every_group_option_composes(group, tmp_path):
    for option in sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")):
        overrides = [f"{group}={option}"]
        if option == "regression":
            overrides.append("data=npz")
            overrides.append("data.source.path=/x.npz")
        cfg = make_cfg("pretrain", overrides, tmp_path)
        OmegaConf.to_container(cfg, resolve=True)


def test_recipes_live_in_data_recipes():
    """`data=<name>` selects data_recipes/<name>.yaml (configs/data links there)."""
    root = Path(__file__).resolve().parents[1]
    assert (root / "configs" / "data").resolve() == (root / "data_recipes").resolve()
