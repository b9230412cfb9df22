"""Run records and atomic writes."""

from __future__ import annotations

import json

import pytest

from fmtransfer.errors import ArtifactError
from fmtransfer.lineage import RunRecord, config_hash, load_record, verify_record, write_json_atomic
from fmtransfer.lineage.io import atomic_path


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = write_json_atomic(tmp_path / "a.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_number_lists_stay_on_one_line(tmp_path):
    path = write_json_atomic(tmp_path / "m.json", {"cm": [[1, 2], [3, 4]], "names": ["a", "b"]})
    assert "[1, 2]" in path.read_text()
    assert json.loads(path.read_text())["cm"] == [[1, 2], [3, 4]]


def test_record_lifecycle_and_verification(tmp_path):
    parent = tmp_path / "parent"
    with RunRecord("pretrain", parent):
        pass
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    out = run / "sub" / "out.bin"
    out.write_bytes(b"x" * 100)
    with RunRecord("evaluate", run, {"a": 1, "run_dir": "ignored"}) as record:
        assert load_record(run)["status"] == "running"
        record.add_parent(parent)
        record.add_output(out, "thing")
    r = load_record(run)
    assert r["status"] == "ok" and r["parents"][0]["stage"] == "pretrain"
    assert r["outputs"][0]["path"] == "sub/out.bin" and r["outputs"][0]["bytes"] == 100
    assert r["packages"]["torch"] and r["ended"]
    assert verify_record(run) == []
    out.write_bytes(b"y" * 100)
    assert "differs" in verify_record(run)[0]


def test_failed_run_is_recorded(tmp_path):
    with pytest.raises(ValueError):
        with RunRecord("pretrain", tmp_path):
            raise ValueError("bad")
    r = load_record(tmp_path)
    assert r["status"] == "failed" and "bad" in r["error"]


def test_config_hash_ignores_output_location():
    assert config_hash({"a": 1, "run_dir": "x"}) == config_hash({"a": 1, "run_dir": "y"})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_parent_must_be_a_run(tmp_path):
    with pytest.raises(ArtifactError, match="not an fmtransfer run directory"):
        RunRecord("x", tmp_path / "r").add_parent(tmp_path)


def test_interrupted_run_is_recorded(tmp_path):
    with pytest.raises(SystemExit):
        with RunRecord("pretrain", tmp_path):
            raise SystemExit(1)  # what Lightning raises after a Ctrl-C
    assert load_record(tmp_path)["status"] == "interrupted"
