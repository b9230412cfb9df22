"""The command line as a user meets it: help, errors without tracebacks, multirun, python -m."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, cli_env


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmtransfer", *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.e2e
def test_help_lists_stages():
    proc = run("--help")
    assert proc.returncode == 0
    for stage in ("pretrain", "evaluate", "adapt", "plan", "merge", "export", "predict", "pipeline"):
        assert stage in proc.stdout


def test_every_stage_has_a_module_entry():
    import importlib.util

    from fmtransfer.cli import STAGES

    for stage in STAGES:
        spec = importlib.util.find_spec(f"fmtransfer.{stage}")
        assert spec is not None, f"python -m fmtransfer.{stage} has no module"
        source = open(spec.origin if spec.submodule_search_locations is None
                      else spec.submodule_search_locations[0] + "/__main__.py").read()
        assert f'run_stage("{stage}"' in source


@pytest.mark.e2e
def test_unknown_stage():
    proc = run("train")
    assert proc.returncode == 2 and "unknown stage 'train'" in proc.stderr


@pytest.mark.e2e
def test_stage_help_is_hydras():
    proc = run("pretrain", "--help")
    assert proc.returncode == 0
    assert "fmtransfer pretrain" in proc.stdout and "backbone: " in proc.stdout and "data: " in proc.stdout


@pytest.mark.e2e
def test_a_data_error_is_one_clear_line(tmp_path):
    proc = run("pretrain", "data=image_folder", f"data.source.root={tmp_path}/nowhere", "data.channels=1",
               f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2
    assert f"error: data.source.root: folder {tmp_path}/nowhere does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("stage,message", [("evaluate", "pass model=<run dir or model file> and/or adapter="),
                                           ("merge", "missing value for 'adapter': pass adapter=...")])
def test_a_missing_input_is_named(tmp_path, stage, message):
    proc = run(stage, f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("override,words", [("data.colour=3", ["data.colour"]),
                                            ("backbone=resnet180", ["resnet180", "resnet18"])])
def test_wrong_key_is_named(tmp_path, override, words):
    proc = run("pretrain", override, f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode != 0 and all(w in proc.stderr for w in words), proc.stderr[-2000:]


@pytest.mark.e2e
def test_multirun_and_module_entry(tmp_path):
    """`-m` sweeps with a run dir per job, and `python -m fmtransfer.<stage>` is `fmtransfer <stage>`."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                              timeout=400, stdin=subprocess.DEVNULL)

    proc = run("-m", "fmtransfer.pretrain", "-m", "backbone=tiny_cnn,tiny_vit", "experiment=smoke", "data.limit=200",
               "trainer.limit_val_batches=1", f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/model.json"))
    assert len(runs) == 2  # sub-dirs are named by job number and overrides
    assert runs[0].startswith("0_backbone=tiny_cnn,") and runs[1].startswith("1_backbone=tiny_vit,")
    jobs = [run(*entry, "backbone=tiny_vit", "--cfg", "job") for entry in (["-m", "fmtransfer", "pretrain"],
                                                                             ["-m", "fmtransfer.pretrain"])]
    assert jobs[0].returncode == 0 and "name: test_vit" in jobs[0].stdout, jobs[0].stderr[-2000:]
    assert jobs[1].stdout == jobs[0].stdout


@pytest.mark.e2e
def test_a_config_answer_loads_no_training_stack():
    """`--cfg`, `--help` and a wrong key are Hydra's answers: the stage's code (torch, Lightning, timm) stays
    unloaded, which is what makes them answer in half a second."""
    code = """
import sys
from fmtransfer.cli import main
for args in (["adapt", "--cfg", "job"], ["pretrain", "--help"], ["adapt", "data.colour=3"]):
    try:
        main(args)
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "pytorch_lightning", "timm") if m in sys.modules)
assert not heavy, heavy
print("light")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and "light" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.e2e
def test_importing_fmtransfer_changes_no_global_state():
    """No module installs warning filters or logging settings when imported; the CLI does, for a run."""
    code = """
import importlib, logging, pkgutil, warnings
import fmtransfer
for m in pkgutil.walk_packages(fmtransfer.__path__, "fmtransfer."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
from fmtransfer.cli import QUIET_WARNINGS
ours = [f for f in warnings.filters if f[1] is not None and f[1].pattern in QUIET_WARNINGS]
assert not ours, ours
assert not logging.getLogger("pytorch_lightning.utilities.rank_zero").filters
assert logging.getLogger("faiss.loader").level == logging.NOTSET
print("clean")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stderr[-3000:]


def test_quiet_third_party_hides_lightning_noise_only_while_a_stage_runs():
    import logging
    import warnings

    from fmtransfer.cli import quiet_third_party

    noise = "The 'train_dataloader' does not have many workers which may be a bottleneck."
    log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    before = list(log.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_third_party():
            warnings.warn(noise, UserWarning, stacklevel=1)
            warnings.warn("a skipped image", UserWarning, stacklevel=1)
            assert len(log.filters) == len(before) + 1
        warnings.warn(noise, UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["a skipped image", noise]
    assert log.filters == before


def test_summary_prints_a_stage_result(tmp_path):
    from fmtransfer.cli import _summary
    from fmtransfer.tasks.result import StageResult

    result = StageResult("adapt", tmp_path, {"test": {"overall": {"accuracy": 0.91234, "n": 90}}},
                         {"adapter": tmp_path / "adapter.safetensors", "report": tmp_path / "r.md"})
    assert _summary(result).splitlines() == [f"run dir: {tmp_path}", f"report:  {tmp_path / 'r.md'}",
                                             'metrics: {"accuracy": 0.9123}']
