"""Supervised pretraining past one process: 2 CPU processes (gloo, ``trainer=ddp``) under torchrun; only rank 0
writes the model, the scores and the metrics (rank 1 used to write them too, over rank 0's files)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, cli_env
from tests.fixtures import make_image_folder


@pytest.mark.e2e
def test_two_processes_write_one_model_and_one_record(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "imgs", per_class=20, size=16)
    out = tmp_path / "run"
    writes = tmp_path / "writes.txt"
    # every save_model call appends its rank: a process that should not write would show up here
    hook = tmp_path / "sitecustomize.py"
    hook.write_text(
        "import os\n"
        "import fmtransfer.models.classifier as c\n"
        "_save = c.save_model\n"
        "def save_model(*a, **k):\n"
        f"    open({str(writes)!r}, 'a').write(os.environ.get('RANK', '?') + '\\n')\n"
        "    return _save(*a, **k)\n"
        "c.save_model = save_model\n")
    env = cli_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env.get('PYTHONPATH', '')}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "fmtransfer",
           "pretrain", "backbone=tiny_cnn", "data=image_folder", f"data.source.root={root}", "data.channels=1",
           "data.image_size=[16,16]", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
           "loader.batch_size=8", "loader.num_workers=0", f"run_dir={out}", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert writes.read_text().split() == ["0"]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "ok" and not record.get("previous_attempts")
    assert json.loads((out / "metrics.json").read_text())["test"]["overall"]["n"] > 0
