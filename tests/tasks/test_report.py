"""report.md: written whole, with pictures relative to it."""

from __future__ import annotations

from fmtransfer.tasks.report import write_report


def test_write_report_writes_the_file(tmp_path):
    picture = tmp_path / "run" / "step" / "curve.png"
    picture.parent.mkdir(parents=True)
    picture.write_bytes(b"png")
    run = {"run_dir": str(tmp_path / "run"), "run_id": "abc", "config_hash": "0123456789abcdef0123"}
    path = write_report(tmp_path / "run" / "report.md", title="a report", run=run,
                        sections=[("Results", "| a |\n|---|")], images=[("Curve", picture)])
    assert path == tmp_path / "run" / "report.md"
    text = path.read_text()
    assert text.startswith("# a report\n") and "## Results\n\n| a |" in text and "![Curve](step/curve.png)" in text
