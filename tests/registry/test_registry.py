"""The artifact registry: content-addressed registration, the stages' hook, lineage, verify, gated promotion with
rollback and an append-only history, and the faults that must lose nothing (two writers, a writer killed mid-write,
a tampered file, bad requests)."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.lineage import RunRecord, load_record
from fmtransfer.lineage.registry import Registry, default_path, register_run, resolve_path
from fmtransfer.tasks.registry import registry
from tests.conftest import ROOT, cli_env, make_cfg
from tests.registry.conftest import export_run, shadow_run

BEATS = {"beats_base": True, "verdict": "adapter better", "checked": True}


def run_action(tmp_path: Path, action: str, *overrides: str):
    return registry(make_cfg("registry", [f"action={action}", *overrides], tmp_path / f"cmd_{action}"))


# --- registering --------------------------------------------------------------------------------------
def test_the_same_bytes_twice_are_one_row_with_two_locations(tmp_path, registry_path):
    a, b = tmp_path / "a.bin", tmp_path / "copy.bin"
    a.write_bytes(b"weights" * 100)
    b.write_bytes(b"weights" * 100)
    with Registry(registry_path) as reg:
        sha = reg.register_file(a, "base", region="global")
        assert reg.register_file(b, "base", region="global") == sha
        assert reg.register(sha, "base") is False  # idempotent
        child = reg.register_file(_write(tmp_path / "child.bin", b"x"), "adapter", parents=[sha, sha])
        reg.register(child, "adapter", parents=[(sha, "base")])
        assert reg.counts() == {"artifacts": 2, "locations": 3, "edges": 2, "history": 0}
        assert sorted(reg.get(sha).paths) == sorted([str(a.resolve()), str(b.resolve())])
        assert reg.find(sha[:8]).sha256 == sha and reg.find(str(b)).sha256 == sha
        assert [p.sha256 for p, _ in reg.parents(child)] == [sha, sha]  # one edge per role


def test_an_unknown_parent_is_a_clear_error_and_writes_nothing(tmp_path, registry_path):
    with Registry(registry_path) as reg:
        with pytest.raises(ArtifactError, match=r"unknown parent\(s\) 0123456789ab .*register the parent first"):
            reg.register_file(_write(tmp_path / "a.bin", b"a"), "adapter", parents=["0123456789ab" + "0" * 52])
        assert reg.counts()["artifacts"] == 0
        with pytest.raises(ArtifactError, match="not a sha256"):
            reg.register("abc", "base")
        with pytest.raises(ArtifactError, match="no artifact 'ffffff'"):
            reg.find("ffffff")


def test_every_run_registers_its_artifacts_with_parents_and_data(tmp_path, registry_path):
    """RunRecord's end is the one hook: a run's outputs, its inputs and data fingerprints, linked."""
    base = _write(tmp_path / "base" / "model.json", b'{"base": 1}')
    onnx = export_run(tmp_path / "export", "uci", inputs={"base": base}, do_no_harm=BEATS)
    with Registry(registry_path) as reg:
        artifact = reg.find(str(onnx))
        assert (artifact.kind, artifact.region, artifact.run_dir) == ("onnx", "uci", str(tmp_path / "export"))
        assert artifact.metrics["passed"] is True
        parents = {p.kind: (p, role) for p, role in reg.parents(artifact.sha256)}
        assert parents["base"][1] == "base" and parents["base"][0].path == str(base.resolve())
        assert parents["data"][0].name == "uci_recipe" and parents["data"][0].sha256 == f"{0:064x}"
        # the sidecar and metrics.json are not artifacts of their own
        assert {a.kind for a in reg.list()} == {"onnx", "base", "data"}
    # a second record of the same bytes (an export rerun) adds nothing
    register_again = load_record(tmp_path / "export")
    with Registry(registry_path) as reg:
        before = reg.counts()
        register_run(reg, register_again)
        assert reg.counts() == before


def test_a_monitor_report_is_the_watched_regions_and_a_run_that_made_no_artifact_adds_nothing(tmp_path,
                                                                                               registry_path):
    model = _write(tmp_path / "model.onnx", b"onnx")

    def record(stage, role):
        return {"run_id": stage, "stage": stage, "run_dir": str(tmp_path / stage), "status": "ok",
                "data": [{"role": "reference", "recipe": "g", "fingerprint": "1" * 64, "spec": {"region": "global"}},
                         {"role": "current", "recipe": "u", "fingerprint": "2" * 64, "spec": {"region": "uci"}}],
                "inputs": [{"role": "model", "path": str(model), "sha256": "3" * 64, "bytes": 4}],
                "outputs": [{"role": role, "path": "out.json", "sha256": "4" * 64, "bytes": 2}]}

    with Registry(registry_path) as reg:
        assert register_run(reg, record("evaluate", "metrics")) == [] and reg.counts()["artifacts"] == 0
        (made,) = register_run(reg, record("monitor", "metrics"))
        report = reg.get(made)
        assert (report.kind, report.region) == ("monitor_report", "uci")
        assert {(p.kind, role) for p, role in reg.parents(made)} == {("data", "reference"), ("data", "current"),
                                                                     ("onnx", "model")}


def test_a_model_trained_on_a_curated_subset_traces_back_to_the_manifest(tmp_path, registry_path):
    manifest = _write(tmp_path / "curate" / "curated.csv", b"id\n1\n2\n")
    with RunRecord("curate", tmp_path / "curate") as record:
        record.set_data("pool", {"name": "pool", "region": "global"}, "5" * 64)
        record.add_output(manifest, "manifest")
    model = _write(tmp_path / "pretrain" / "model.json", b"{}")
    with RunRecord("pretrain", tmp_path / "pretrain") as record:
        record.set_data("pool", {"name": "pool", "region": "global", "subset": str(manifest)}, "6" * 64)
        record.add_output(model, "model")
    with Registry(registry_path) as reg:
        base = reg.find(str(model))
        parents = {role: p for p, role in reg.parents(base.sha256)}
        assert parents["subset"].kind == "curated_manifest" and parents["subset"].run_dir == str(tmp_path / "curate")
        assert [p.sha256 for p, _ in reg.parents(parents["subset"].sha256)] == ["5" * 64]


def test_a_run_never_fails_for_an_unreachable_registry(tmp_path, monkeypatch, caplog):
    blocker = _write(tmp_path / "not_a_dir", b"")
    monkeypatch.setenv("FMTRANSFER_REGISTRY", str(blocker / "registry.sqlite"))
    with caplog.at_level(logging.WARNING):
        export_run(tmp_path / "export", "uci")
    assert load_record(tmp_path / "export")["status"] == "ok"
    assert "not updated" in caplog.text and "fmtransfer registry add" in caplog.text
    # a file that is not SQLite: the same warning, and the command says what the file is
    garbage = _write(tmp_path / "garbage.sqlite", b"not a database" * 100)
    monkeypatch.setenv("FMTRANSFER_REGISTRY", str(garbage))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        export_run(tmp_path / "export2", "uci", seed=1)
    assert load_record(tmp_path / "export2")["status"] == "ok" and "not updated" in caplog.text
    with pytest.raises(ArtifactError, match="garbage.sqlite is not a usable SQLite file"):
        run_action(tmp_path, "list")
    # registering it later, once the registry can be reached
    monkeypatch.setenv("FMTRANSFER_REGISTRY", str(tmp_path / "ok.sqlite"))
    run_action(tmp_path, "add", f"artifact={tmp_path / 'export'}")
    with Registry(tmp_path / "ok.sqlite") as reg:
        assert [a.kind for a in reg.list(kind="onnx")] == ["onnx"]


def test_where_the_registry_lives(tmp_path, monkeypatch):
    monkeypatch.delenv("FMTRANSFER_REGISTRY", raising=False)
    monkeypatch.setenv("FMTRANSFER_CACHE", str(tmp_path / "cache"))
    assert default_path() == tmp_path / "cache" / "registry.sqlite"
    monkeypatch.setenv("FMTRANSFER_REGISTRY", "off")
    assert default_path() is None and resolve_path(None) is None
    assert resolve_path(str(tmp_path / "x.sqlite")) == tmp_path / "x.sqlite" and resolve_path(False) is None
    # off: a run registers nothing and still ends ok
    export_run(tmp_path / "export", "uci")
    assert not (tmp_path / "cache" / "registry.sqlite").exists()


def test_a_rerun_into_the_same_dir_replaces_the_file_it_is_not_tampering(tmp_path, registry_path):
    first = export_run(tmp_path / "export", "uci", seed=1)
    with Registry(registry_path) as reg:
        old = reg.find(str(first)).sha256
    export_run(tmp_path / "export", "uci", seed=2)  # the same run dir, other bytes at the same path
    assert run_action(tmp_path, "verify").metrics["files"] == 1
    with Registry(registry_path) as reg:
        assert reg.get(old).paths == [] and reg.find(str(first)).sha256 != old
    with pytest.raises(ArtifactError, match="integrity: file missing"):
        run_action(tmp_path, "promote", f"artifact={old}", "region_name=uci")


def test_a_registry_of_the_first_schema_is_upgraded_in_place(tmp_path):
    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript("CREATE TABLE locations (sha256 TEXT NOT NULL, path TEXT NOT NULL, added TEXT NOT NULL, "
                         "PRIMARY KEY (sha256, path)); PRAGMA user_version = 1;")
    with Registry(path) as reg:
        reg.register_file(_write(tmp_path / "a.bin", b"a"), "base")
        assert reg.db.execute("PRAGMA user_version").fetchone()[0] == 2 and len(reg.verify()) == 1


# --- list, show, lineage, verify ----------------------------------------------------------------------
def test_list_show_and_lineage_from_the_onnx_back_to_the_data(tmp_path, registry_path, capsys):
    base = _write(tmp_path / "base" / "model.json", b'{"base": 2}')
    onnx = export_run(tmp_path / "export", "uci", inputs={"base": base})
    export_run(tmp_path / "export_b", "kenya", seed=1)
    listed = run_action(tmp_path, "list", "kind=onnx", "region_name=uci").metrics["artifacts"]
    with Registry(registry_path) as reg:
        assert listed == [reg.find(str(onnx)).sha256]
    shown = run_action(tmp_path, "show", f"artifact={onnx}").metrics
    assert shown["kind"] == "onnx" and {p["kind"] for p in shown["parents"]} == {"base", "data"}
    result = run_action(tmp_path, "lineage", f"artifact={listed[0][:10]}")
    tree = result.outputs["lineage"].read_text()
    assert tree.splitlines()[0].startswith(f"onnx {listed[0][:12]}") and "(base) base" in tree
    assert "(data) data" in tree and "uci_recipe" in tree
    assert result.outputs["graph"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(result.metrics["edges"]) == 2
    # the copy on a device, wherever it lies, is found by its bytes
    device = _write(tmp_path / "device" / "deployed.onnx", onnx.read_bytes())
    assert run_action(tmp_path, "lineage", f"artifact={device}").metrics["artifact"] == listed[0]


def test_verify_flags_a_tampered_and_a_missing_file(tmp_path, registry_path, capsys):
    good = export_run(tmp_path / "good", "uci", seed=1)
    tampered = export_run(tmp_path / "tampered", "uci", seed=2)
    missing = export_run(tmp_path / "missing", "uci", seed=3)
    assert run_action(tmp_path, "verify").metrics["files"] == 3
    with open(tampered, "ab") as f:
        f.write(b"\0")
    missing.unlink()
    with pytest.raises(ArtifactError, match=r"2 of 3 file\(s\) failed"):
        run_action(tmp_path, "verify")
    out = capsys.readouterr().out
    assert "TAMPERED  onnx" in out and str(tampered) in out and "MISSING   onnx" in out and str(missing) in out
    assert str(good) not in out and "1 ok, 1 tampered, 1 missing" in out


# --- promotion, rollback, history ---------------------------------------------------------------------
def test_promote_rollback_and_an_append_only_history(tmp_path, registry_path):
    first = export_run(tmp_path / "v1", "uci", seed=1, do_no_harm=BEATS)
    second = export_run(tmp_path / "v2", "uci", seed=2, do_no_harm=BEATS)
    with pytest.raises(ArtifactError, match="region 'uci' has no earlier production artifact.*nothing was ever"):
        run_action(tmp_path, "rollback", "region_name=uci")
    one = run_action(tmp_path, "promote", f"artifact={first}", "region_name=uci", "release_stage=production").metrics
    assert one["decision"] == "accepted"
    assert {g["name"]: g["passed"] for g in one["evidence"]["gates"]} == {
        "integrity": True, "export_gates": True, "do_no_harm": True, "shadow": None}
    with pytest.raises(ArtifactError, match="no earlier production artifact"):
        run_action(tmp_path, "rollback", "region_name=uci")
    run_action(tmp_path, "promote", f"artifact={second}", "region_name=uci")
    back = run_action(tmp_path, "rollback", "region_name=uci").metrics
    with Registry(registry_path) as reg:
        assert back["sha256"] == reg.find(str(first)).sha256
        assert reg.production_stack("uci", "production") == [back["sha256"]]
        rows = reg.history("uci")
        assert [(r["action"], r["decision"]) for r in rows] == [("promote", "accepted")] * 2 + [("rollback", "accepted")]
        assert rows[1]["previous"] == rows[0]["sha256"]
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            reg.db.execute("UPDATE history SET decision = 'refused'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            reg.db.execute("DELETE FROM history")
    assert len(run_action(tmp_path, "history", "region_name=uci").metrics["history"]) == 3


def test_promote_refuses_a_tampered_artifact_and_records_why(tmp_path, registry_path):
    onnx = export_run(tmp_path / "v1", "uci", do_no_harm=BEATS)
    with open(onnx, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(ArtifactError, match="refused onnx .* integrity: .*tampered"):
        run_action(tmp_path, "promote", f"artifact={_registered_sha(registry_path, 'onnx')}", "region_name=uci")
    with Registry(registry_path) as reg:
        (row,) = reg.history("uci")
        assert row["decision"] == "refused" and reg.production_stack("uci", "production") == []
        assert row["evidence"]["gates"][0]["name"] == "integrity"


@pytest.mark.parametrize("case,match", [
    ("rejected", "export_gates: max_abs_diff 0.5 \\(limit 0.001\\)"),
    ("harm", "do_no_harm: beats_base=False"),
    ("shadow_keep", "shadow: latest shadow run .*'keep production'"),
])
def test_promote_refuses_failed_gates(tmp_path, registry_path, case, match):
    harm = {"beats_base": False, "verdict": "inconclusive", "forced": True} if case == "harm" else BEATS
    onnx = export_run(tmp_path / "cand", "uci", seed=1, gates_passed=case != "rejected", do_no_harm=harm)
    if case == "shadow_keep":
        prod = export_run(tmp_path / "prod", "uci", seed=2)
        shadow_run(tmp_path / "shadow", onnx, prod, "keep production")
    with pytest.raises(ArtifactError, match=f"refused .*{match}"):
        run_action(tmp_path, "promote", f"artifact={onnx}", "region_name=uci")


def test_a_shadow_verdict_for_it_backs_the_promotion(tmp_path, registry_path):
    onnx = export_run(tmp_path / "cand", "uci", seed=1)
    prod = export_run(tmp_path / "prod", "uci", seed=2)
    shadow_run(tmp_path / "shadow_as_production", prod, onnx, "keep production")  # about the other model
    shadow_run(tmp_path / "shadow", onnx, prod, "promote")
    gates = run_action(tmp_path, "promote", f"artifact={onnx}", "region_name=uci").metrics["evidence"]["gates"]
    assert gates[-1]["name"] == "shadow" and gates[-1]["passed"] is True and "shadow" in gates[-1]["detail"]


def test_bad_promotions_are_clear_errors(tmp_path, registry_path):
    onnx = export_run(tmp_path / "kenya", "kenya")
    with pytest.raises(ArtifactError, match="made for region 'kenya', not 'uci'"):
        run_action(tmp_path, "promote", f"artifact={onnx}", "region_name=uci")
    with pytest.raises(ArtifactError, match="data .* is not an ONNX export"):
        run_action(tmp_path, "promote", f"artifact={0:064x}", "region_name=kenya")
    with pytest.raises(ConfigError, match="missing region; pass `fmtransfer registry promote region=<region>`"):
        run_action(tmp_path, "promote", f"artifact={onnx}")
    with pytest.raises(ConfigError, match=r"stage=.prod. \(release_stage\): expected one of staging, production"):
        run_action(tmp_path, "promote", f"artifact={onnx}", "region_name=kenya", "release_stage=prod")
    with pytest.raises(ConfigError, match="unknown action 'lst'; choose one of: list, show"):
        run_action(tmp_path, "lst")
    with Registry(registry_path) as reg:
        assert reg.history() == []  # requests that were never decisions leave no history


# --- faults: concurrent writers, a writer killed mid-write --------------------------------------------
_WRITER = textwrap.dedent("""
    import sys, time, hashlib
    from pathlib import Path
    from fmtransfer.lineage.registry import Registry
    path, name, n, shared, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
    while not go.exists():
        time.sleep(0.005)
    reg = Registry(path)
    sha = lambda text: hashlib.sha256(text.encode()).hexdigest()
    reg.register(sha("root"), "data", name="root")
    for i in range(n):
        reg.register(sha(f"{name}-{i}"), "adapter", region=name, parents=[sha("root")])
        if i < shared:
            reg.register(sha(f"shared-{i}"), "base", region="both", parents=[sha("root")])
    print("done", flush=True)
""")


def test_two_processes_register_at_once_and_lose_nothing(tmp_path):
    path, go = tmp_path / "registry.sqlite", tmp_path / "go"
    n, shared = 150, 60
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), name, str(n), str(shared), str(go)],
                              cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("w1", "w2")]
    time.sleep(1.0)  # both imported and waiting: they start together
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "done" in out, err
    with Registry(path) as reg:
        assert reg.counts() == {"artifacts": 1 + 2 * n + shared, "locations": 0, "edges": 2 * n + shared, "history": 0}
        assert len(reg.list(region="w1")) == n and len(reg.list(region="w2")) == n
        assert reg.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert reg.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


_KILLED = textwrap.dedent("""
    import sys, os, hashlib
    from pathlib import Path
    from fmtransfer.lineage.io import write_bytes_atomic
    from fmtransfer.lineage.registry import Registry, register_run
    path, folder, kill_at = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    reg = Registry(path)
    if kill_at == "mid_run":  # die inside run 3's transaction, after 12 of its 25 outputs were written to it
        register, count = reg.register, [0]

        def dying(sha, kind, **kw):
            count[0] += kind == "onnx"
            if count[0] == 3 * 25 + 13:
                os.kill(os.getpid(), 9)
            return register(sha, kind, **kw)

        reg.register = dying
    for run in range(10_000):
        outputs = []
        for j in range(25):
            data = os.urandom(4096)
            f = write_bytes_atomic(folder / f"{run}_{j}.bin", data)
            outputs.append({"role": "onnx_fp32", "path": str(f), "sha256": hashlib.sha256(data).hexdigest(),
                            "bytes": 4096})
        record = {"run_id": f"run{run}", "stage": "export", "run_dir": str(folder), "status": "ok",
                  "data": [{"role": "data", "recipe": "r", "fingerprint": "ab" * 32, "spec": {"region": "uci"}}],
                  "inputs": [], "outputs": outputs}
        # one run's outputs in one transaction: all of them or none
        register_run(reg, record)
        print(run, flush=True)
""")


@pytest.mark.parametrize("kill_at", ["mid_run", "0.8", "1.3"])
def test_a_writer_killed_mid_write_leaves_no_half_artifact_and_no_dangling_row(tmp_path, kill_at):
    """Killed inside a run's registration (``mid_run``: deterministically, half its outputs written), or at a
    moment of the clock while it writes files and registers them."""
    path, folder = tmp_path / "registry.sqlite", tmp_path / "files"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(path), str(folder), kill_at], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # it has committed one run: the kill lands in a later one
    assert first.strip() == "0", proc.stderr.read()
    if kill_at == "mid_run":
        assert proc.wait(timeout=60) == -signal.SIGKILL
    else:
        time.sleep(float(kill_at))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    with Registry(path) as reg:
        assert reg.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert reg.db.execute("PRAGMA foreign_key_check").fetchall() == []
        runs = reg.db.execute("SELECT run_id, count(*) FROM artifacts WHERE kind = 'onnx' GROUP BY run_id").fetchall()
        assert runs and all(count == 25 for _, count in runs)  # every run whole, none half
        if kill_at == "mid_run":
            assert sorted(r for r, _ in runs) == ["run0", "run1", "run2"]
        orphans = reg.db.execute("SELECT count(*) FROM artifacts a WHERE kind = 'onnx' AND NOT EXISTS "
                                 "(SELECT 1 FROM edges e WHERE e.child = a.sha256)").fetchone()[0]
        assert orphans == 0
        assert all(c.status == "ok" for c in reg.verify())  # every registered file whole, as registered
    # the files: each whole at its name, or absent (a killed write leaves at most a hidden temporary file)
    assert all(f.stat().st_size == 4096 for f in folder.glob("*.bin"))


# --- the command line ---------------------------------------------------------------------------------
def test_positional_words_become_the_action_and_artifact():
    from fmtransfer.cli import positional_overrides

    assert positional_overrides("registry", ["promote", "0123456", "region=uci", "stage=production"]) == [
        "action='promote'", "artifact='0123456'", "region_name=uci", "release_stage=production"]
    assert positional_overrides("registry", ["--help"]) == ["--help"]
    assert positional_overrides("registry", ["list", "kind=onnx"]) == ["action='list'", "kind=onnx"]
    assert positional_overrides("pretrain", ["region=x"]) == ["region=x"]


def test_only_a_read_only_registry_question_runs_in_a_scratch_dir():
    from fmtransfer.cli import positional_overrides, scratch_run

    def scratch(*words):
        return scratch_run("registry", positional_overrides("registry", list(words)))

    assert scratch() and scratch("list", "kind=onnx") and scratch("show", "0123456") and scratch("verify")
    assert scratch("history", "region=uci")
    assert not scratch("lineage", "0123456")  # writes lineage.png into its run dir
    assert not scratch("promote", "0123456", "region=uci") and not scratch("rollback", "region=uci")
    assert not scratch("add", "runs/x")
    assert not scratch("list", "hydra.run.dir=/tmp/mine") and not scratch("list", "run_dir=/tmp/mine")
    assert not scratch("list", "--cfg", "job") and not scratch("-m", "list")
    assert not scratch("list", "hydra.output_subdir=.cfg")  # a Hydra setting of the user's is kept as given
    assert not scratch_run("pretrain", ["data=mnist_global"])


@pytest.mark.e2e
def test_cli_registry(tmp_path, registry_path):
    onnx = export_run(tmp_path / "v1", "uci", do_no_harm=BEATS)
    env = {**cli_env(), "FMTRANSFER_REGISTRY": str(registry_path)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "fmtransfer", "registry", *args, f"hydra.run.dir={tmp_path}/h"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)

    helped = subprocess.run([sys.executable, "-m", "fmtransfer", "registry", "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "fmtransfer registry" in helped.stdout and "region_name" in helped.stdout
    wrong = cli("lst")
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines() == [
        "fmtransfer registry: error: registry: unknown action 'lst'; choose one of: list, show, lineage, verify, "
        "promote, rollback, history, add"]
    sha = _registered_sha(registry_path, "onnx")
    promoted = cli("promote", sha[:9], "region=uci", "stage=production")
    assert promoted.returncode == 0 and f"promoted onnx {sha[:12]}" in promoted.stdout, promoted.stderr
    listed = cli("list", "kind=onnx", "region=uci")
    assert listed.returncode == 0 and sha[:12] in listed.stdout and str(onnx) in listed.stdout
    none = cli("rollback", "region=uci")
    assert none.returncode == 2 and "no earlier production artifact" in none.stderr
    # a question that only reads leaves no outputs/registry/<time> folder behind
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    asked = subprocess.run([sys.executable, "-m", "fmtransfer", "registry", "list"], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert asked.returncode == 0 and sha[:12] in asked.stdout and "run dir:" not in asked.stdout, asked.stderr
    assert list(cwd.iterdir()) == []


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _registered_sha(registry_path: Path, kind: str) -> str:
    with Registry(registry_path) as reg:
        (a,) = reg.list(kind=kind)
        return a.sha256




# --- W&B ----------------------------------------------------------------------------------------------
def test_wandb_only_when_logged_in_and_never_at_a_runs_cost(tmp_path, registry_path, monkeypatch, caplog):
    from fmtransfer.lineage import registry_wandb

    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not registry_wandb.logged_in()  # no key, no netrc: logged out, nothing prompts
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert registry_wandb.logged_in()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not registry_wandb.logged_in()

    calls = []
    monkeypatch.setattr(registry_wandb, "log_run", lambda reg, record, made: calls.append(made))
    export_run(tmp_path / "offline", "uci", seed=1)
    assert calls == []  # offline: not even tried
    monkeypatch.delenv("WANDB_MODE")
    export_run(tmp_path / "online", "uci", seed=2)
    assert len(calls) == 1 and len(calls[0]) == 1  # logged in: the run's registered output

    def down(reg, record, made):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(registry_wandb, "log_run", down)
    with caplog.at_level(logging.WARNING):
        export_run(tmp_path / "down", "uci", seed=3)
    assert load_record(tmp_path / "down")["status"] == "ok" and "W&B: the run's artifacts were not logged" in caplog.text


@pytest.mark.slow
def test_wandb_artifacts_carry_the_registry_edges(tmp_path, registry_path, monkeypatch):
    """W&B's offline mode (no account needed) logs the outputs with their sha256 and parents."""
    from fmtransfer.lineage import registry_wandb

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    base = _write(tmp_path / "base" / "model.json", b'{"base": 3}')
    onnx = export_run(tmp_path / "export", "uci", inputs={"base": base})
    with Registry(registry_path) as reg:
        artifact = reg.find(str(onnx))
        registry_wandb.log_run(reg, load_record(tmp_path / "export"), [artifact.sha256], mode="offline")
        parents = [p.sha256 for p, _ in reg.parents(artifact.sha256)]
    (log,) = (tmp_path / "wandb").rglob("*.wandb")
    blob = log.read_bytes()
    assert b"onnx-uci" in blob and f"sha256-{artifact.short}".encode() in blob
    assert all(p.encode() in blob for p in parents)


# --- real stages --------------------------------------------------------------------------------------
REGION = ["data=uci_digits_region", "data.limit=300"]
FAST = ["export.latency.repeats=2", "export.latency.warmup=1", "export.calibration.size=64",
        "export.gates.min_int8_agreement=0.9", "export.gates.max_accuracy_drop=0.05"]


@pytest.mark.slow
def test_real_stages_register_their_lineage_and_the_export_is_promoted(base, tmp_path, registry_path):
    from fmtransfer.tasks.adapt import adapt
    from fmtransfer.tasks.export import export

    adapter = adapt(make_cfg("adapt", [f"base={base}", *REGION, "adapter.steps=40", "calibration.size=60",
                                       "logger=none"], tmp_path / "adapt")).outputs["adapter"]
    exported = export(make_cfg("export", [f"adapter_file={adapter}", *REGION, *FAST], tmp_path / "export"))
    with Registry(registry_path) as reg:
        onnx = reg.find(str(exported.outputs["onnx_int8"]))
        assert (onnx.kind, onnx.region, onnx.metrics["passed"]) == ("onnx", "uci", True)
        assert {c.kind for c, _ in reg.children(onnx.sha256)} == {"monitor_reference"}
        assert reg.find(str(adapter)).kind == "adapter"
    tree = run_action(tmp_path, "lineage", f"artifact={exported.outputs['onnx_int8']}").outputs["lineage"].read_text()
    assert "(adapter) adapter" in tree and "(base) base" in tree and "uci_digits_region" in tree
    decided = run_action(tmp_path, "promote", f"artifact={onnx.sha256}", "region_name=uci").metrics
    assert decided["decision"] == "accepted"
    assert {g["name"]: g["passed"] for g in decided["evidence"]["gates"]}["do_no_harm"] is True


def test_a_switch_to_wal_refused_at_once_is_asked_again(tmp_path, monkeypatch):
    """Two processes opening a new registry at once: SQLite answers one of them "database is locked" for the switch to
    WAL without waiting (CI saw it); the registry asks again instead of calling the file unusable."""
    from fmtransfer.lineage import registry as registry_module

    real_connect, refusals = sqlite3.connect, []

    class Busy:
        def __init__(self, db):
            object.__setattr__(self, "_db", db)

        def execute(self, sql, *args):
            if sql.startswith("PRAGMA journal_mode") and len(refusals) < 2:
                refusals.append(sql)
                raise sqlite3.OperationalError("database is locked")
            return self._db.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self._db, name)

        def __setattr__(self, name, value):
            setattr(self._db, name, value)

    monkeypatch.setattr(registry_module.sqlite3, "connect", lambda *a, **k: Busy(real_connect(*a, **k)))
    with registry_module.Registry(tmp_path / "r.sqlite") as reg:
        assert len(refusals) == 2
        assert reg.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
