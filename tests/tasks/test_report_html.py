"""report.html: the pipeline's report as one self-contained page, checked in a headless browser."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmtransfer.tasks.report import write_report

RUN = {"run_dir": "/runs/x", "run_id": "abc", "config_hash": "0123456789abcdef0123"}


def _png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 8), value, np.uint8)).save(path)
    return path


def test_html_twin_inlines_every_picture_and_renders_tables(tmp_path):
    pics = [("Confusion", _png(tmp_path / "pretrain" / "confusion.png", 10)),
            ("Curve", _png(tmp_path / "plan" / "curve.png", 200))]
    table = "| model | accuracy |\n|---|---:|\n| global | 0.9800 |"
    md = write_report(tmp_path / "report.md", title="fmtransfer pipeline report", run=RUN,
                      sections=[("Results", table)], images=pics)
    page = (tmp_path / "report.html").read_text()
    assert md == tmp_path / "report.md" and "<table>" in page and re.search(r"<td[^>]*>0.9800</td>", page)
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "pretrain/confusion.png" not in page and "<title>fmtransfer pipeline report</title>" in page


def test_a_missing_picture_is_named(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        write_report(tmp_path / "report.md", title="t", run=RUN, sections=[],
                     images=[("Gone", tmp_path / "nowhere.png")])
    assert "1 picture(s) not found" in caplog.text and "nowhere.png" in caplog.text
    assert 'src="nowhere.png"' in (tmp_path / "report.html").read_text()


def chromium() -> str | None:
    """A headless Chromium: on PATH, else installed from Debian's package when this runs as root with apt-get
    (FMTRANSFER_NO_APT=1 forbids it); None when neither works."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("FMTRANSFER_NO_APT") or not shutil.which("apt-get") or os.geteuid() != 0:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode != 0:
            return None
    return shutil.which("chromium")


def rendered_dom(page: Path, browser: str) -> str:
    """The page's DOM after its load event, as headless Chromium built it."""
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
def test_pipeline_report_html_loads_every_picture_in_a_browser(cfg_factory, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no headless Chromium: not on PATH and apt-get could not install Debian's chromium package")
    from fmtransfer.tasks.pipeline import pipeline

    result = pipeline(cfg_factory("pipeline", "experiment=smoke", "region.limit=200", "sweep.sizes=[20]",
                                  "sweep.adapters=[lora]", "calibration.size=20", 'adapt_overrides=["adapter.steps=2"]',
                                  "curate_global=false", "pretrain_curated=false", "export_region_model=false"))
    page = tmp_path / "pipeline" / "report.html"
    md = (tmp_path / "pipeline" / "report.md").read_text()
    pictures = len(re.findall(r"!\[", md))
    assert page.is_file() and pictures >= 4 and "src=\"data:image/png;base64," in page.read_text()
    dom = rendered_dom(page, browser)
    assert f'data-images-loaded="{pictures}/{pictures}"' in dom, re.findall(r"data-images-loaded=\"[^\"]*\"", dom)
    assert "<p class=\"missing\">" not in dom
    # the key numbers, as the report prints them
    glob = result.steps["pretrain"].metrics["test"]["overall"]["accuracy"]
    zero = result.steps["zero_shot"].metrics["overall"]["accuracy"]
    for value in (glob, zero):
        assert f"{value:.4f}" in dom
    assert "Monitoring: the region against the global data" in dom
