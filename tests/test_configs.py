"""Every entry config composes, alone and with every experiment and every option of every group; the
configs ship in the package, and a user's own config dirs add groups beside them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import fmtransfer
from fmtransfer.config import CONFIG_PATH_ENV, compose_stage, config_dir, with_search_path
from fmtransfer.data import load_recipe
from fmtransfer.errors import ConfigError
from fmtransfer.models.backbone import backbone_spec
from tests.conftest import ROOT, cli_env, make_cfg

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


def test_configs_ship_in_the_package(monkeypatch, tmp_path):
    """The configs are package data; the checkout's configs/ and data_recipes/ are links into the package."""
    monkeypatch.delenv("FMTRANSFER_CONFIG_DIR", raising=False)
    packaged = Path(fmtransfer.__file__).resolve().parent / "configs"
    assert config_dir() == packaged and (packaged / "data" / "mnist_global.yaml").is_file()
    assert not (packaged / "data").is_symlink()  # a wheel does not keep links: the recipes are real files
    for link, target in (("configs", packaged), ("data_recipes", packaged / "data")):
        assert (ROOT / link).is_symlink() and (ROOT / link).resolve() == target, link
    monkeypatch.setenv("FMTRANSFER_CONFIG_DIR", str(tmp_path))
    assert config_dir() == tmp_path
    monkeypatch.setenv("FMTRANSFER_CONFIG_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="nowhere does not exist"):
        config_dir()


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A user's own config dir: a region recipe built on a packaged one, and an experiment that uses it."""
    (tmp_path / "user" / "data").mkdir(parents=True)
    (tmp_path / "user" / "experiment").mkdir()
    (tmp_path / "user" / "data" / "my_region.yaml").write_text(
        "defaults:\n  - uci_digits_region\n  - _self_\nname: my_region\nregion: mine\nlimit: 200\n")
    (tmp_path / "user" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - smoke\n  - override /data: my_region\n  - _self_\nseed: 7\n"
        "trainer:\n  limit_val_batches: 1\n")
    return tmp_path / "user"


def test_user_groups_from_a_search_path_override(user_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(CONFIG_PATH_ENV, raising=False)
    cfg = compose_stage("adapt", ["data=my_region", "base=x", f"run_dir={tmp_path}",
                                  f"hydra.searchpath=[file://{user_dir}]"])
    assert (cfg.data.name, cfg.data.region, cfg.data.source.kind) == ("my_region", "mine", "sklearn_digits")
    cfg = compose_stage("pretrain", ["experiment=mine", f"run_dir={tmp_path}", f"hydra.searchpath=[file://{user_dir}]"])
    assert (cfg.data.name, cfg.seed, cfg.backbone.name) == ("my_region", 7, "test_resnet")
    with pytest.raises(Exception, match="my_region"):  # without the search path the option is unknown
        compose_stage("adapt", ["data=my_region", "base=x", f"run_dir={tmp_path}"])


def test_user_groups_from_the_environment(user_dir, tmp_path, monkeypatch):
    other = tmp_path / "other" / "experiment"
    other.mkdir(parents=True)
    (other / "theirs.yaml").write_text("# @package _global_\nseed: 9\n")
    monkeypatch.setenv(CONFIG_PATH_ENV, f"{user_dir}{os.pathsep}{other.parent}")
    cfg = compose_stage("pretrain", ["experiment=mine", f"run_dir={tmp_path}"])
    assert (cfg.data.name, cfg.seed) == ("my_region", 7)
    assert compose_stage("pretrain", ["experiment=theirs", f"run_dir={tmp_path}"]).seed == 9
    # a search path given as an override keeps its entries and gains the environment's
    mine_only = tmp_path / "mine_only"
    (mine_only / "data").mkdir(parents=True)
    (mine_only / "data" / "solo.yaml").write_text("defaults:\n  - mnist_global\n  - _self_\nname: solo\n")
    cfg = compose_stage("pretrain", ["data=solo", "experiment=theirs", f"run_dir={tmp_path}",
                                     f"hydra.searchpath=[file://{mine_only}]"])
    assert (cfg.data.name, cfg.seed) == ("solo", 9)
    monkeypatch.setenv(CONFIG_PATH_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=f"{CONFIG_PATH_ENV}: config directory .*nowhere does not exist"):
        compose_stage("pretrain", [f"run_dir={tmp_path}"])


def test_search_path_goes_where_a_command_line_takes_it(user_dir, monkeypatch):
    monkeypatch.delenv(CONFIG_PATH_ENV, raising=False)
    line = ["-m", "seed=1,2", "--cfg", "job"]
    assert with_search_path(line) == line
    monkeypatch.setenv(CONFIG_PATH_ENV, str(user_dir))
    added = f"hydra.searchpath=['file://{user_dir}']"
    assert with_search_path(line) == ["-m", added, "seed=1,2", "--cfg", "job"]
    assert with_search_path(["--info", "searchpath"]) == [added, "--info", "searchpath"]
    assert with_search_path(["seed=1", "hydra.searchpath=[pkg://x,file:///a]"]) == [
        "seed=1", f"hydra.searchpath=['pkg://x','file:///a','file://{user_dir}']"]


def test_compose_in_a_running_app_keeps_its_search_path(user_dir, tmp_path, monkeypatch):
    """The pipeline composes its adapt runs inside its own Hydra app: the user's groups stay reachable."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.delenv(CONFIG_PATH_ENV, raising=False)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        app = compose("pipeline", [f"hydra.searchpath=[file://{user_dir}]", f"run_dir={tmp_path}"],
                      return_hydra_config=True)
        HydraConfig.instance().set_config(app)
        try:
            sub = compose_stage("adapt", ["data=my_region", "base=x", f"run_dir={tmp_path}"])
        finally:
            HydraConfig.instance().cfg = None
    assert sub.data.name == "my_region"


@pytest.mark.e2e
def test_user_groups_on_the_command_line(user_dir, tmp_path):
    """`fmtransfer <stage>` takes a user's config dir by --config-dir, hydra.searchpath or the environment."""
    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fmtransfer", *args], cwd=tmp_path, env={**cli_env(), **env},
                              capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)

    for way in (["--config-dir", str(user_dir)], [f"hydra.searchpath=[file://{user_dir}]"]):
        proc = run("adapt", "data=my_region", *way, "--cfg", "job", "--package", "data")
        assert proc.returncode == 0 and "name: my_region" in proc.stdout, proc.stderr[-2000:]
    # a real sweep: the override the environment adds must not break Hydra's `-m` command line
    proc = run("pretrain", "-m", "experiment=mine", "logger=none", f"hydra.sweep.dir={tmp_path}/sweep",
               **{CONFIG_PATH_ENV: str(user_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = (tmp_path / "sweep").glob("*/.hydra/config.yaml")
    assert OmegaConf.load(job).data.name == "my_region"
    proc = run("pretrain", **{CONFIG_PATH_ENV: str(tmp_path / "nowhere")})
    assert proc.returncode == 2 and f"{CONFIG_PATH_ENV}: config directory" in proc.stderr
    assert "Traceback" not in proc.stderr
