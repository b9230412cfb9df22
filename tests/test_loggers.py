"""Loggers: CSV by default; W&B works with no account (offline, no prompt); TensorBoard optional."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fmtransfer.config import wandb_offline
from tests.conftest import ROOT, cli_env


def test_wandb_offline_unless_logged_in(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_offline() is True
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert wandb_offline() is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline() is True


@pytest.mark.e2e
def test_wandb_run_without_account(tmp_path):
    """A real run with logger=wandb, no account, no network, closed stdin: it must not prompt or fail."""
    env = cli_env()
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        env.pop(key, None)
    env["HOME"] = str(tmp_path / "home")
    env["NETRC"] = str(tmp_path / "home" / ".netrc")
    env["FMTRANSFER_CACHE"] = str(tmp_path / "cache")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fmtransfer", "pretrain", "experiment=smoke", "logger=wandb",
                           "data.limit=200", f"hydra.run.dir={run}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, os.listdir(run)
    assert any(offline[0].rglob("*.wandb"))


@pytest.mark.slow
def test_tensorboard_logger(cfg_factory, tmp_path):
    from fmtransfer.tasks.pretrain import pretrain

    pretrain(cfg_factory("pretrain", "experiment=smoke", "logger=tensorboard", "data.limit=200"))
    assert list((tmp_path / "pretrain" / "tensorboard").glob("events.out.tfevents.*"))
