"""`pip install fmtransfer` without the checkout: scripts/check_wheel.sh builds the wheel, installs it into a
fresh venv and runs the smoke pipeline with the installed command from a folder outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT


@pytest.mark.e2e
@pytest.mark.slow
def test_installed_wheel_runs_the_smoke_pipeline(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FMTRANSFER_CONFIG_DIR")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "check_wheel.sh")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=1500, stdin=subprocess.DEVNULL,
                          env={**env, "WORK_DIR": str(tmp_path), "PYTHON": sys.executable})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    venv = tmp_path / "venv"
    assert f"fmtransfer imported from: {venv}/" in proc.stdout
    run = tmp_path / "run" / "pipeline"
    assert "## Edge export" in (run / "report.md").read_text()
    # the pipeline composed its config from the configs inside the installed package, not the checkout's
    sources = OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.runtime.config_sources
    (main,) = [s.path for s in sources if s.provider == "main"]
    assert main.startswith(str(venv)) and main.endswith("site-packages/fmtransfer/configs"), main
