"""Shared fixtures: Hydra composition of real entry configs, with outputs in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from fmtransfer.config import config_dir

ROOT = Path(__file__).resolve().parents[1]
# fast defaults for tests: tiny backbone, a few batches, no logger noise
FAST = ["backbone=tiny_cnn", "trainer=debug", "logger=csv", "loader.batch_size=32"]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No test writes to ~/.cache or reaches W&B; the scan cache goes to a temp folder."""
    monkeypatch.setenv("FMTRANSFER_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def make_cfg(stage: str, overrides: list[str], run_dir: Path) -> DictConfig:
    """Compose ``configs/<stage>.yaml`` with overrides, as the CLI would, writing into ``run_dir``."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name=stage, overrides=[*overrides, f"run_dir={run_dir}"])
    return cfg


@pytest.fixture
def cfg_factory(tmp_path):
    def factory(stage: str, *overrides: str, run_dir: Path | None = None) -> DictConfig:
        return make_cfg(stage, list(overrides), run_dir or tmp_path / stage)
    return factory


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def read_yaml(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))
