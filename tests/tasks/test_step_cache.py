"""step_cache: a step's key follows its config, its parents, its data's content and the code; a finished step is
reused only while its run ended ok and its outputs are unchanged."""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from fmtransfer.lineage import RunRecord
from fmtransfer.tasks import step_cache
from fmtransfer.tasks.result import StageResult
from tests.fixtures import make_npz


def _sub(tmp_path, **changes):
    npz = tmp_path / "d.npz"
    if not npz.exists():
        make_npz(npz, n=30, channels=1)
    node = {"stage": "evaluate", "run_dir": str(tmp_path / "run"), "seed": 1, "model": str(tmp_path / "p" / "model.json"),
            "data": {"name": "tiny", "source": {"kind": "npz", "path": str(npz)}, "image_size": [16, 16],
                     "channels": 1}}
    node.update(changes)
    return OmegaConf.create(node)


def test_the_key_follows_config_parents_and_data_content(tmp_path):
    folders = {"pretrain": [tmp_path / "p"], "other": [tmp_path / "q"]}
    key, inputs = step_cache.step_key(_sub(tmp_path), {"pretrain": "a" * 64, "other": "b" * 64}, folders)
    assert inputs["parents"] == {"pretrain": "a" * 64}  # only the step whose folder the config names
    assert list(inputs["data"]) == ["data"] and inputs["code"] == step_cache.code_version()
    same, _ = step_cache.step_key(_sub(tmp_path, run_dir=str(tmp_path / "elsewhere")), {"pretrain": "a" * 64},
                                  folders)
    assert same == key  # the run dir is not an input
    assert step_cache.step_key(_sub(tmp_path, seed=2), {"pretrain": "a" * 64}, folders)[0] != key
    assert step_cache.step_key(_sub(tmp_path), {"pretrain": "c" * 64}, folders)[0] != key  # the parent ran again
    # the same pipeline in another run dir: its parent's folder is elsewhere, its content (key) the same
    moved = _sub(tmp_path, model=str(tmp_path / "run2" / "p" / "model.json"))
    assert step_cache.step_key(moved, {"pretrain": "a" * 64}, {"pretrain": [tmp_path / "run2" / "p"]})[0] == key
    make_npz(tmp_path / "d.npz", n=31, channels=1)  # the same recipe, other content
    assert step_cache.step_key(_sub(tmp_path), {"pretrain": "a" * 64}, folders)[0] != key


def test_a_recipe_is_fingerprinted_once_a_run(tmp_path, monkeypatch):
    import fmtransfer.data as data

    calls = []
    real = data.build_table
    monkeypatch.setattr(data, "build_table", lambda recipe, *a, **k: calls.append(recipe.name) or real(recipe, *a, **k))
    memo: dict = {}
    first = step_cache.data_fingerprints(OmegaConf.to_container(_sub(tmp_path)), memo)
    again = step_cache.data_fingerprints(OmegaConf.to_container(_sub(tmp_path, seed=3)), memo)  # another step
    assert first == again and calls == ["tiny"]
    step_cache.data_fingerprints(OmegaConf.to_container(_sub(tmp_path)))  # no memo: read again
    assert calls == ["tiny", "tiny"]


def _finished_run(folder):
    out = folder / "metrics.json"
    with RunRecord("evaluate", folder, OmegaConf.create({"stage": "evaluate"})) as record:
        out.write_text('{"accuracy": 0.5}')
        record.add_output(out, "metrics")
    return StageResult("evaluate", folder, {"accuracy": 0.5, "curves": {20: [0.1, 0.2]}}, {"metrics": out},
                       [("Results", "| a |")])


def test_remember_then_recall_and_link(tmp_path):
    result = _finished_run(tmp_path / "old_run")
    step_cache.remember("k" * 64, {"stage": "evaluate", "config": {}}, result)
    got = step_cache.recall("k" * 64)
    # int keys survive the round trip (plan's curves are keyed by calibration size)
    assert got is not None and got.metrics == result.metrics and got.sections == [("Results", "| a |")]
    assert got.outputs["metrics"] == (tmp_path / "old_run" / "metrics.json").resolve()
    assert step_cache.recall("z" * 64) is None
    step_cache.link(tmp_path / "new" / "evaluate", got.run_dir)
    assert (tmp_path / "new" / "evaluate").is_symlink()
    assert (tmp_path / "new" / "evaluate" / "metrics.json").read_text() == '{"accuracy": 0.5}'


def test_a_changed_output_or_a_failed_run_is_not_reused(tmp_path, caplog):
    result = _finished_run(tmp_path / "old_run")
    step_cache.remember("k" * 64, {"stage": "evaluate", "config": {}}, result)
    (tmp_path / "old_run" / "metrics.json").write_text('{"accuracy": 0.9}')
    with caplog.at_level(logging.WARNING):
        assert step_cache.recall("k" * 64) is None
    assert "cannot be reused" in caplog.text and "sha256 differs" in caplog.text
    failed = tmp_path / "failed_run"
    try:
        with RunRecord("evaluate", failed, OmegaConf.create({"stage": "evaluate"})):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    step_cache.remember("f" * 64, {"stage": "evaluate", "config": {}},
                        StageResult("evaluate", failed, {}, {}, []))
    assert step_cache.recall("f" * 64) is None


def test_code_version_follows_the_package_files(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.yaml").write_text("k: 1\n")
    monkeypatch.setattr(step_cache, "PACKAGE", tmp_path)
    step_cache.code_version.cache_clear()
    try:
        first = step_cache.code_version()
        (tmp_path / "notes.txt").write_text("not code")
        step_cache.code_version.cache_clear()
        assert step_cache.code_version() == first
        (tmp_path / "a.py").write_text("x = 2\n")
        step_cache.code_version.cache_clear()
        assert step_cache.code_version() != first
    finally:
        step_cache.code_version.cache_clear()


def test_a_folder_that_holds_steps_depends_on_each_of_them(tmp_path):
    """plan reads the adapt sweep's folder: every adapt step in it is its parent, and the pipeline's own folder
    does not enter the key."""
    out = tmp_path / "pipe"
    folders = {"adapt/lora_n50": [out / "adapt" / "lora_n50"], "adapt/lora_n100": [out / "adapt" / "lora_n100"],
               "pretrain": [out / "pretrain"]}
    keys = {name: name[0] * 64 for name in folders}
    sub = OmegaConf.create({"stage": "plan", "run_dir": str(out / "plan"), "sweep": str(out / "adapt")})
    key, inputs = step_cache.step_key(sub, keys, folders, base=out)
    assert sorted(inputs["parents"]) == ["adapt/lora_n100", "adapt/lora_n50"]
    assert inputs["config"]["sweep"] == "{pipeline}/adapt"
    other = tmp_path / "pipe2"
    moved = {name: [other / p[0].relative_to(out)] for name, p in folders.items()}
    sub2 = OmegaConf.create({"stage": "plan", "run_dir": str(other / "plan"), "sweep": str(other / "adapt")})
    assert step_cache.step_key(sub2, keys, moved, base=other)[0] == key
    assert step_cache.step_key(sub2, {**keys, "adapt/lora_n50": "x" * 64}, moved, base=other)[0] != key
