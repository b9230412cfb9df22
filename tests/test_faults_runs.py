"""Fault injection, runs and run dirs (issue #12, items 3 and 4): earlier work reused without checking what made
it, and two writers in one run dir.

One test function per fault; its docstring names the fault and what the user sees (README.md, "Reliability", has
the same table). Cases call the stages in-process with configs composed as the CLI composes them, or run the CLI
itself (``e2e``). Every model and data set is tiny.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fmtransfer.errors import ArtifactError, ConfigError, DataError
from fmtransfer.lineage import RunRecord, load_record, sha256_file, write_json_atomic
from fmtransfer.lineage.lock import LOCK_FILE
from fmtransfer.tasks.pretrain import pretrain
from tests.conftest import ROOT, cli_env, make_cfg

# two epochs of two batches: a checkpoint in seconds
PRETRAIN = ["experiment=smoke", "data=uci_digits_region", "data.limit=200", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1"]
REGION = ["data=uci_digits_region", "data.limit=200", "adapter.steps=4", "calibration.size=20", "logger=none"]
CURATE = ["data.limit=120", "curation.levels=[4,2]", "curation.resampling_steps=1", "curation.target_size=0.5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished two-epoch pretrain run (checkpoints/last.ckpt, logs/metrics.csv); read-only: copy it to change it."""
    return pretrain(make_cfg("pretrain", [*PRETRAIN, "trainer.max_epochs=2"],
                             tmp_path_factory.mktemp("trained") / "run")).run_dir


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- item 3: resume= and curate's embeddings reused without identity ---------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("seed=7", "seed"),
    ("data.split.seed=1", "data.split.seed"),           # the new test split would hold samples trained on
    ("method.optimizer.lr=0.01", "method.optimizer.lr"),
    ("data.limit=150", "data.fingerprint"),             # other data
])
def test_resume_with_another_setup(trained, tmp_path, override, key):
    """Fault: resume= a checkpoint written with another seed, split seed, learning rate or data (it was accepted, and
    with another split seed the new test split overlapped the checkpoint's train split). User sees: a ConfigError
    before any training, naming each differing key with the checkpoint's value and this run's, and
    resume_force=true."""
    with pytest.raises(ConfigError) as e:
        pretrain(make_cfg("pretrain", [*PRETRAIN, "trainer.max_epochs=2", override, f"resume={trained}"],
                          tmp_path / "run"))
    message = str(e.value)
    assert f"resume={trained}" in message and f"{key}=" in message and "resume_force=true" in message
    assert "\n" not in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_force_resumes_another_setup_and_records_it(trained, tmp_path, caplog):
    """Fault: the same, with resume_force=true. User sees: a warning naming the differences; the run resumes and its
    run.json lists the differing keys (resume_differs)."""
    caplog.set_level(logging.WARNING)
    result = pretrain(make_cfg("pretrain", [*PRETRAIN, "trainer.max_epochs=2", "seed=7", "resume_force=true",
                                            f"resume={trained}"], tmp_path / "run"))
    assert result.metrics["epochs"] == 2
    assert load_record(tmp_path / "run")["resume_differs"] == ["seed"]
    assert any("seed=42 there, 7 here" in r.getMessage() and "resume_force=true" in r.getMessage()
               for r in caplog.records)


def test_resume_of_a_checkpoint_without_a_setup(trained, tmp_path):
    """Fault: resume= a checkpoint that records no setup (written before fmtransfer stored one, or by other code).
    User sees: a ConfigError saying nothing shows it continues this run, and resume_force=true."""
    old = tmp_path / "old" / "checkpoints" / "last.ckpt"
    old.parent.mkdir(parents=True)
    state = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state.pop("fmtransfer_setup", None)
    torch.save(state, old)
    with pytest.raises(ConfigError, match=r"holds no record of its run's setup.*resume_force=true"):
        pretrain(make_cfg("pretrain", [*PRETRAIN, "trainer.max_epochs=2", f"resume={old}"], tmp_path / "run"))


@pytest.mark.slow
def test_adapt_resume_with_another_calibration_seed(base, tmp_path):
    """Fault: adapt resume= a checkpoint of a run with another calibration seed (another calibration set). User
    sees: a ConfigError before anything is written, naming calibration.seed with both values."""
    from fmtransfer.tasks.adapt import adapt

    adapt(make_cfg("adapt", [f"base={base}", *REGION, "keep_checkpoints=true", "checkpoints=1"], tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"calibration.seed=0 there, 5 here"):
        adapt(make_cfg("adapt", [f"base={base}", *REGION, "calibration.seed=5", f"resume={tmp_path / 'a'}"],
                       tmp_path / "b"))
    assert not (tmp_path / "b" / "run.json").exists()


def test_resume_in_the_same_run_dir_keeps_its_history(trained, tmp_path):
    """Fault: resuming into the run dir of the run being resumed, which overwrote that run's id, made the run its
    own parent and deleted the earlier epochs' rows from logs/metrics.csv. User sees: run.json keeps the earlier
    attempt (previous_attempts, and as the parent), and metrics.csv holds every epoch."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    first = load_record(run)
    pretrain(make_cfg("pretrain", [*PRETRAIN, "trainer.max_epochs=3", f"resume={run}"], run))
    record = load_record(run)
    assert record["run_id"] != first["run_id"]
    assert [p["run_id"] for p in record["parents"]] == [first["run_id"]]
    assert {r["epoch"] for r in _rows(run) if r["train/loss_epoch"]} == {"0", "1", "2"}
    assert record["previous_attempts"][-1]["run_id"] == first["run_id"]
    assert record["previous_attempts"][-1]["status"] == "ok"
    assert not (run / "logs" / "metrics.earlier.csv").exists()


@pytest.mark.e2e
def test_killed_run_resumed_in_its_own_dir(tmp_path, caplog):
    """Fault: `kill -9` mid-epoch, then resume= the killed run into its own dir. User sees: a warning that the dead
    run's lock was stale and is taken over; the run resumes; run.json names the killed attempt (status running) as
    previous attempt and parent; metrics.csv keeps the killed attempt's epoch-0 rows."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fmtransfer.pretrain", *PRETRAIN, "trainer.max_epochs=2",
                           f"hydra.run.dir={run}", "+callbacks.kill._target_=tests.helpers.KillAt",
                           "+callbacks.kill.epoch=1", "+callbacks.kill.batch=1"], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    killed = load_record(run)
    assert killed["status"] == "running" and (run / LOCK_FILE).is_file()
    killed_rows = [r for r in _rows(run) if r["epoch"] == "0"]
    stale_pid = json.loads((run / LOCK_FILE).read_text())["pid"]
    caplog.set_level(logging.WARNING)
    pretrain(make_cfg("pretrain", [*PRETRAIN, "trainer.max_epochs=2", f"resume={run}"], run))
    assert any("took over a stale lock" in r.getMessage() and f"pid {stale_pid} " in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    record = load_record(run)
    assert record["previous_attempts"][-1] == {k: killed[k] for k in ("run_id", "stage", "status", "started", "ended")}
    assert record["parents"][0]["run_id"] == killed["run_id"] != record["run_id"]
    rows = _rows(run)
    assert killed_rows and all(r in rows for r in killed_rows)
    assert {r["epoch"] for r in rows if r["train/loss_epoch"]} == {"0", "1"}
    assert not (run / LOCK_FILE).exists()


def _other_model(base: Path, folder: Path, change: str) -> Path:
    """A copy of ``base`` with other weights or another preprocessing (a model.json of its own, no run record)."""
    from fmtransfer.models import load_model
    from fmtransfer.models.classifier import save_model

    model, meta = load_model(base)
    meta = copy.deepcopy(meta)
    if change == "weights":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05)
    else:
        meta["preprocess"]["mean"] = [0.5]
    save_model(model, meta, folder)
    return folder / "model.json"


@pytest.mark.slow
@pytest.mark.parametrize("change, key", [("weights", "model.weights_sha256"), ("preprocess", "model.preprocess.mean")])
def test_curate_resume_over_another_base(base, tmp_path, change, key):
    """Fault: `curate base=B resume=<a curate run over base A>`, which reused A's embeddings and recorded base B.
    User sees: a ConfigError naming resume= and what differs (the model's weights sha256 or its preprocessing),
    before anything is clustered; the earlier run's files are left as they were."""
    from fmtransfer.tasks.curate import curate

    first = curate(make_cfg("curate", [f"base={base}", *CURATE], tmp_path / "a")).run_dir
    before = {p: sha256_file(p) for p in sorted(first.rglob("*")) if p.is_file()}
    other = _other_model(base, tmp_path / "other", change)
    with pytest.raises(ConfigError) as e:
        curate(make_cfg("curate", [f"base={other}", *CURATE, f"resume={first}"], tmp_path / "b"))
    assert f"resume={first}" in str(e.value) and f"{key}=" in str(e.value) and "drop resume=" in str(e.value)
    assert not (tmp_path / "b" / "curated.csv").exists()
    assert before == {p: sha256_file(p) for p in sorted(first.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_curate_resume_of_killed_shards_over_another_base(base, tmp_path, monkeypatch):
    """Fault: a curate run that died mid-embedding left shards; resuming it over another base mixed those shards in.
    User sees: resume= over another base is refused, naming the weights; over the same base the finished shard is
    reused (and copied into the new run: the killed run's folder is left alone)."""
    import fmtransfer.models.inference as inference
    from fmtransfer.tasks.curate import curate

    real, calls = inference.embed, []

    def dies_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "embed", dies_on_second)
    args = [*CURATE, "curation.embed.shard_size=40"]  # 96 train rows: shards 0-2
    with pytest.raises(RuntimeError, match="killed"):
        curate(make_cfg("curate", [f"base={base}", *args], tmp_path / "a"))
    (shards,) = (tmp_path / "a" / "embeddings").glob("shards-*")
    assert sorted(p.name for p in shards.iterdir()) == ["shard_00000.npy", "state.json"]
    other = _other_model(base, tmp_path / "other", "weights")
    with pytest.raises(ConfigError, match=r"model.weights_sha256="):
        curate(make_cfg("curate", [f"base={other}", *args, f"resume={tmp_path / 'a'}"], tmp_path / "b"))
    calls.clear()
    monkeypatch.setattr(inference, "embed", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    curate(make_cfg("curate", [f"base={base}", *args, f"resume={tmp_path / 'a'}"], tmp_path / "c"))
    assert len(calls) == 2  # shards 1 and 2; shard 0 came from the killed run
    assert sorted(p.name for p in shards.iterdir()) == ["shard_00000.npy", "state.json"]


def _adapt_run(folder: Path, base_file: Path, *, recipe: str = "uci", size: int = 50, accuracy: float = 0.9,
               status: str = "ok") -> Path:
    """An adapt run's metrics.json and run.json (its base as an input, its status), as plan reads them."""
    folder.mkdir(parents=True)
    write_json_atomic(folder / "metrics.json", {
        "stage": "adapt", "method": "lora", "recipe": recipe, "base": str(base_file),
        "calibration": {"size": size, "strategy": "stratified", "seed": 0},
        "test": {"overall": {"accuracy": accuracy}}, "zero_shot": None})
    try:
        with RunRecord("adapt", folder) as record:
            record.add_input(base_file, "base")
            if status != "ok":
                raise RuntimeError(status)
    except RuntimeError:
        pass
    return folder


@pytest.fixture
def bases(tmp_path) -> tuple[Path, Path]:
    (tmp_path / "b1").mkdir()
    (tmp_path / "b2").mkdir()
    return (tmp_path / "b1" / "model.safetensors", tmp_path / "b2" / "model.safetensors")


def test_plan_leaves_out_unfinished_runs(tmp_path, bases):
    """Fault: an adapt sweep holding a run that failed after an earlier attempt's metrics.json (status 'failed'),
    whose accuracy plan merged into the curve. User sees: the run is left out, listed with its status in plan.md and
    plan.json (skipped) and in a warning."""
    from fmtransfer.tasks.plan import plan

    bases[0].write_bytes(b"base one")
    sweep = tmp_path / "sweep"
    _adapt_run(sweep / "0", bases[0], size=50, accuracy=0.8)
    _adapt_run(sweep / "1", bases[0], size=100, accuracy=0.9)
    _adapt_run(sweep / "2", bases[0], size=100, accuracy=0.1, status="failed")
    result = plan(make_cfg("plan", [f"sweep={sweep}"], tmp_path / "p"))
    assert result.metrics["runs"] == 2 and result.metrics["curves"]["lora"][100]["values"] == [0.9]
    assert result.metrics["skipped"] == [{"run_dir": str(sweep / "2"),
                                          "reason": "its run ended with status 'failed', not 'ok'"}]
    assert "status 'failed'" in (tmp_path / "p" / "plan.md").read_text()


def test_plan_refuses_a_sweep_of_several_recipes_or_bases(tmp_path, bases):
    """Fault: adapt runs of another recipe, or over another base, under the sweep folder, which plan merged into one
    curve. User sees: a DataError naming each recipe (or base: sha256 and path) with its run count and recipe= (or
    base=); with recipe= / base= the other runs are left out and listed."""
    from fmtransfer.tasks.plan import plan

    bases[0].write_bytes(b"base one")
    bases[1].write_bytes(b"base two")
    sweep = tmp_path / "sweep"
    _adapt_run(sweep / "0", bases[0], size=50)
    _adapt_run(sweep / "1", bases[0], size=100)
    _adapt_run(sweep / "2", bases[0], size=100, recipe="other")
    with pytest.raises(DataError, match=r"2 different recipes \('uci': 2 run\(s\); 'other': 1 run\(s\)\).*recipe="):
        plan(make_cfg("plan", [f"sweep={sweep}"], tmp_path / "p1"))
    result = plan(make_cfg("plan", [f"sweep={sweep}", "recipe=uci"], tmp_path / "p2"))
    assert result.metrics["runs"] == 2
    assert result.metrics["skipped"] == [{"run_dir": str(sweep / "2"), "reason": "recipe 'other', not uci"}]

    _adapt_run(sweep / "3", bases[1], size=300)
    with pytest.raises(DataError, match=r"2 different bases .*b1/model.safetensors.*b2/model.safetensors.*base="):
        plan(make_cfg("plan", [f"sweep={sweep}", "recipe=uci"], tmp_path / "p3"))
    result = plan(make_cfg("plan", [f"sweep={sweep}", "recipe=uci", f"base={bases[0].parent}"], tmp_path / "p4"))
    assert result.metrics["runs"] == 2 and result.metrics["base"]["sha256"] == sha256_file(bases[0])
    assert {s["run_dir"] for s in result.metrics["skipped"]} == {str(sweep / "2"), str(sweep / "3")}
    by_sha = plan(make_cfg("plan", [f"sweep={sweep}", "recipe=uci", f"base={sha256_file(bases[1])[:10]}"],
                           tmp_path / "p5"))
    assert by_sha.metrics["runs"] == 1


# --- item 4: two runs in one directory -----------------------------------------------------------------------------

@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of ``tmp_path / 'run'`` (it prints 'locked' once it does)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from fmtransfer.lineage.lock import acquire; "
                             "acquire(sys.argv[1], 'adapt'); print('locked', flush=True); time.sleep(120)", str(run)],
                            cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield run, proc.pid
    proc.kill()
    proc.wait()


def test_second_writer_in_a_run_dir(base, holder):
    """Fault: a second adapt run into a run dir another live process is writing (both used to exit 0, one's record
    and adapter beside the other's calibration.csv). User sees: an ArtifactError naming the dir, the holder's stage,
    pid and host, before anything is written; the holder's lock stays."""
    from fmtransfer.tasks.adapt import adapt

    run, pid = holder
    with pytest.raises(ArtifactError) as e:
        adapt(make_cfg("adapt", [f"base={base}", *REGION], run))
    message = str(e.value)
    assert f"{run} is in use by adapt (pid {pid} on host {socket.gethostname()}" in message
    assert "still running" in message and "\n" not in message
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run: Path, **info) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lock = run / LOCK_FILE
    lock.write_text(json.dumps({"host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
                                "stage": "adapt", "process_start": None, "token": "t", **info}))
    return lock


def test_stale_lock_of_a_dead_process(base, tmp_path, caplog):
    """Fault: a lock left by a run killed with `kill -9` (its pid no longer runs on this host). User sees: a warning
    naming the stale lock's pid and stage; the run takes it over, completes, and removes the lock."""
    from fmtransfer.tasks.evaluate import evaluate

    run = tmp_path / "run"
    pid = _dead_pid()
    _write_lock(run, pid=pid)
    caplog.set_level(logging.WARNING)
    evaluate(make_cfg("evaluate", [f"model={base}", "data=uci_digits_region", "data.limit=100"], run))
    assert any("took over a stale lock" in r.getMessage() and f"pid {pid} " in r.getMessage()
               for r in caplog.records)
    assert load_record(run)["status"] == "ok" and not (run / LOCK_FILE).exists()


def test_lock_from_another_host(base, tmp_path):
    """Fault: a run dir on a shared file system locked by a run on another host (its pid cannot be checked from
    here). User sees: an ArtifactError naming that host and pid, and the lock file to remove if that run is dead."""
    from fmtransfer.tasks.evaluate import evaluate

    run = tmp_path / "run"
    lock = _write_lock(run, pid=_dead_pid(), host="node-17")
    with pytest.raises(ArtifactError, match=rf"pid \d+ on host node-17.*remove {lock}"):
        evaluate(make_cfg("evaluate", [f"model={base}", "data=uci_digits_region", "data.limit=100"], run))
    assert lock.is_file() and not (run / "run.json").exists()


@pytest.mark.e2e
def test_two_adapt_runs_in_one_dir_from_the_command_line(base, tmp_path):
    """Fault: two `fmtransfer adapt` runs into the same hydra.run.dir at once (both exited 0; the record and adapter
    described one, calibration.csv and .hydra/overrides.yaml came from the other). User sees: the second exits 2
    with one line naming the first's pid, before Hydra writes anything; the first ends well with its own files."""
    run, go = tmp_path / "run", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-m", "fmtransfer", "adapt", f"base={base}", *REGION,
                              f"hydra.run.dir={run}", "+callbacks.wait._target_=tests.helpers.WaitForFile",
                              f"+callbacks.wait.path={go}"], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "run.json").is_file() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (run / "run.json").is_file(), first.communicate()[1][-2000:]
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        second = subprocess.run([sys.executable, "-m", "fmtransfer", "adapt", f"base={base}", *REGION,
                                 "calibration.size=30", f"hydra.run.dir={run}"], cwd=ROOT, env=cli_env(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "Traceback" not in second.stderr
        assert f"fmtransfer adapt: error: {run} is in use by adapt (pid {first.pid} on host" in second.stderr
        assert (run / ".hydra" / "overrides.yaml").read_text() == overrides
    finally:
        go.touch()
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    with open(run / "calibration.csv") as f:
        assert len(list(csv.DictReader(f))) == 20
    assert "calibration.size=30" not in (run / ".hydra" / "overrides.yaml").read_text()
    assert load_record(run)["status"] == "ok" and not (run / LOCK_FILE).exists()


def test_publishing_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
    """Fault: a power cut after an artifact is written (the rename alone can reach the disk before the bytes, leaving
    an empty or partial file under the final name). User sees: nothing; every atomic write fsyncs the file before
    the rename and the folder after it."""
    import fmtransfer.lineage.io as io

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst), os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "fsync", fsync)
    monkeypatch.setattr(io.os, "replace", replace)
    path = write_json_atomic(tmp_path / "a.json", {"v": 1})
    inode = path.stat().st_ino
    assert events == [("fsync", "file", inode), ("replace", str(path), inode),
                      ("fsync", "dir", tmp_path.stat().st_ino)]
