"""The main job on tiny settings: pretrain, global and zero-shot evaluation, report.md with pictures."""

from __future__ import annotations

import re

from fmtransfer.lineage import load_record
from fmtransfer.tasks.pipeline import pipeline


def test_pipeline_report(cfg_factory, tmp_path):
    result = pipeline(cfg_factory("pipeline", "experiment=smoke", "region.limit=200"))
    out = tmp_path / "pipeline"
    report = (out / "report.md").read_text()
    assert "| global test_resnet | mnist_global | global | test |" in report
    assert "| global test_resnet, zero-shot | uci_digits_region | uci | test |" in report
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (out / image).is_file(), image
    assert len(re.findall(r"!\[", report)) == 3
    record = load_record(out)
    assert [p["stage"] for p in record["parents"]] == ["pretrain", "evaluate"]
    assert load_record(out / "zero_shot")["parents"][0]["stage"] == "pretrain"
    assert result["steps"]["zero_shot"]["metrics"]["overall"]["n"] == 60
