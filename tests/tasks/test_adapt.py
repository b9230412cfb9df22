"""adapt, evaluate adapter=, merge and plan end to end on tiny bases."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.lineage import load_record, verify_record
from fmtransfer.tasks.adapt import adapt
from fmtransfer.tasks.evaluate import evaluate
from fmtransfer.tasks.merge import merge
from fmtransfer.tasks.plan import plan
from fmtransfer.tasks.pretrain import pretrain
from tests.conftest import ROOT, cli_env, make_cfg
from tests.fixtures import make_image_folder

REGION = ["data=uci_digits_region", "data.limit=300"]
QUICK = ["adapter.steps=6", "calibration.size=30", "logger=none"]


def test_lora_adapter_end_to_end(base, cfg_factory, tmp_path):
    result = adapt(cfg_factory("adapt", f"base={base}", *REGION, *QUICK))
    out = tmp_path / "adapt"
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "lora" and m["calibration"] == {"size": 30, "strategy": "stratified", "seed": 0}
    assert 0 < m["trainable_fraction"] < 0.2 and m["adapter_bytes"] == (out / "adapter.safetensors").stat().st_size
    assert m["zero_shot"]["overall"]["n"] == m["test"]["overall"]["n"] == 90
    # calibration ids come from the train split only, and are saved
    with open(out / "calibration.csv") as f:
        chosen = {r["id"] for r in csv.DictReader(f)}
    with open(out / "data" / "uci_digits_region.splits.csv") as f:
        split_of = {r["id"]: r["split"] for r in csv.DictReader(f)}
    assert len(chosen) == 30 and {split_of[i] for i in chosen} == {"train"}
    record = load_record(out)
    assert record["parents"][0]["stage"] == "pretrain" and verify_record(out) == []

    # the adapter alone, applied by evaluate, reproduces the stage's numbers; so does the merged model
    ev = evaluate(cfg_factory("evaluate", f"adapter_file={result.outputs['adapter']}", *REGION, run_dir=tmp_path / "ev"))
    assert ev.metrics["overall"]["accuracy"] == m["test"]["overall"]["accuracy"]
    merged = merge(cfg_factory("merge", f"adapter_file={result.outputs['adapter']}", run_dir=tmp_path / "merged"))
    ev2 = evaluate(cfg_factory("evaluate", f"model={merged.run_dir}", *REGION, run_dir=tmp_path / "ev2"))
    assert ev2.metrics["overall"]["accuracy"] == pytest.approx(m["test"]["overall"]["accuracy"], abs=1e-9)
    assert {p["stage"] for p in load_record(tmp_path / "merged")["parents"]} == {"pretrain", "adapt"}


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["linear_probe", "bitfit", "full", "scratch"])
def test_every_method_runs(base, cfg_factory, adapter):
    m = adapt(cfg_factory("adapt", f"base={base}", f"adapter={adapter}", *REGION, *QUICK)).metrics
    assert m["method"] == adapter and m["test"]["overall"]["n"] == 90
    if adapter == "linear_probe":
        assert m["trainable_parameters"] == 96 * 10 + 10  # the head alone
    if adapter in ("full", "scratch"):
        assert m["trainable_fraction"] == 1.0


@pytest.mark.slow
def test_vpt_on_a_vit_base(vit_base, cfg_factory):
    m = adapt(cfg_factory("adapt", f"base={vit_base}", "adapter=vpt", "adapter.method.num_tokens=4", *REGION,
                          *QUICK)).metrics
    assert m["method"] == "vpt" and m["trainable_fraction"] < 0.2


@pytest.mark.slow
def test_diverse_strategy(base, cfg_factory, tmp_path):
    m = adapt(cfg_factory("adapt", f"base={base}", "calibration.strategy=diverse", *REGION, *QUICK)).metrics
    assert m["calibration"]["strategy"] == "diverse"
    with open(tmp_path / "adapt" / "calibration.csv") as f:
        assert len(list(csv.DictReader(f))) == 30


@pytest.mark.slow
def test_new_classes_get_a_new_head(base, cfg_factory, tmp_path):
    root = make_image_folder(tmp_path / "weeds", classes=("0", "1", "weed"), per_class=20, size=28)
    m = adapt(cfg_factory("adapt", f"base={base}", "data=image_folder", f"data.source.root={root}",
                          "data.channels=1", "data.image_size=[28,28]", *QUICK, "calibration.size=20")).metrics
    assert m["head"] == "new head: 2 of 3 classes initialised from the global head"
    assert m["zero_shot"] is None  # the global head cannot score a class it never had


def test_bad_input_leaves_nothing(base, cfg_factory, tmp_path):
    out = tmp_path / "adapt"
    with pytest.raises(ConfigError, match=r"calibration.size=5000 is larger than the train split .* \(180 samples"):
        adapt(cfg_factory("adapt", f"base={base}", *REGION, "calibration.size=5000"))
    with pytest.raises(ConfigError, match="adapter=vpt needs a Vision Transformer"):
        adapt(cfg_factory("adapt", f"base={base}", "adapter=vpt", *REGION, *QUICK))
    with pytest.raises(ConfigError, match="calibration.strategy='best'"):
        adapt(cfg_factory("adapt", f"base={base}", *REGION, "calibration.strategy=best"))
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_tampered_adapter_is_refused(base, cfg_factory, tmp_path):
    result = adapt(cfg_factory("adapt", f"base={base}", *REGION, *QUICK))
    path = tmp_path / "adapt" / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="do not match the sha256"):
        evaluate(cfg_factory("evaluate", f"adapter_file={result.outputs['adapter']}", *REGION, run_dir=tmp_path / "ev"))
    other = pretrain(make_cfg("pretrain", ["experiment=smoke", "seed=7"], tmp_path / "other"))
    good = adapt(cfg_factory("adapt", f"base={base}", *REGION, *QUICK, run_dir=tmp_path / "good"))
    with pytest.raises(ArtifactError, match="was trained on base"):
        evaluate(cfg_factory("evaluate", f"adapter_file={good.outputs['adapter']}", f"model={other.run_dir}", *REGION,
                             run_dir=tmp_path / "ev3"))


@pytest.mark.e2e
def test_sweep_and_plan_from_the_command_line(base, tmp_path):
    """`fmtransfer adapt -m ...` then `fmtransfer plan sweep=...`, as a user runs them."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "fmtransfer", "adapt", "-m", f"base={base}", *REGION,
                           "adapter.steps=4", "logger=none", "calibration.size=10,30", "adapter=lora,linear_probe",
                           f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=400, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "fmtransfer", "plan", f"sweep={sweep}",
                           f"hydra.run.dir={tmp_path / 'plan'}"], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=200, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert result["runs"] == 4 and set(result["curves"]) == {"lora", "linear_probe"}
    assert set(result["curves"]["lora"]) == {"10", "30"}
    assert (tmp_path / "plan" / "learning_curve.png").stat().st_size > 5000
    text = (tmp_path / "plan" / "plan.md").read_text()
    assert "| lora |" in text and "Zero-shot" in text


def test_plan_arithmetic(tmp_path):
    from fmtransfer.tasks.plan import labels_needed, summarise

    runs = [{"method": m, "calibration": {"size": n}, "test": {"overall": {"accuracy": a}},
             "zero_shot": {"overall": {"accuracy": 0.5}}}
            for m, n, a in [("lora", 50, 0.80), ("lora", 100, 0.90), ("lora", 100, 0.94), ("lora", 300, 0.96),
                            ("probe", 50, 0.70), ("probe", 300, 0.87), ("scratch", 300, 0.99)]]
    summary = summarise(runs)
    assert summary["curves"]["lora"][100]["mean"] == pytest.approx(0.92)
    assert summary["curves"]["lora"][100]["std"] == pytest.approx(0.02)
    best, needed = labels_needed(summary["curves"], [0.9, 0.99])
    assert best == pytest.approx(0.96)  # reference methods (scratch) do not set the bar
    # 0.9 * 0.96 = 0.864: lora's mean at 100 is 0.92; 0.99 * 0.96 = 0.9504: only lora at 300 (0.96)
    assert needed["lora"] == {0.9: 100, 0.99: 300} and needed["probe"] == {0.9: 300, 0.99: None}
    from fmtransfer.errors import DataError

    with pytest.raises(DataError, match="no adapt runs"):
        plan(make_cfg("plan", [f"sweep={tmp_path}"], tmp_path / "p"))


@pytest.mark.slow
def test_val_split_is_scored_and_resume_continues(base, cfg_factory, tmp_path):
    first = adapt(cfg_factory("adapt", f"base={base}", *REGION, *QUICK, "checkpoints=2", "keep_checkpoints=true",
                              run_dir=tmp_path / "a"))
    m = first.metrics
    assert m["val"]["overall"]["n"] == 30 and m["test"]["overall"]["n"] == 90
    assert (tmp_path / "a" / "checkpoints" / "last.ckpt").is_file()
    again = adapt(cfg_factory("adapt", f"base={base}", *REGION, *QUICK, f"resume={tmp_path / 'a'}",
                              run_dir=tmp_path / "b"))
    assert again.metrics["test"]["overall"] == m["test"]["overall"]  # a finished run resumes to the same end
    assert load_record(tmp_path / "b")["inputs"][0]["role"] == "base"
    assert not (tmp_path / "b" / "checkpoints").exists()  # by default only the adapter stays


def test_a_calibration_manifest_picks_its_first_ids(base, cfg_factory, tmp_path):
    """calibration.manifest (e.g. monitor's label_first.csv): the first calibration.size ids in file order are the
    calibration set, recorded with the manifest's sha256; ids in val or test, or not in the recipe, are refused
    before anything trains."""
    first = adapt(cfg_factory("adapt", f"base={base}", *REGION, *QUICK, "do_no_harm.folds=0", run_dir=tmp_path / "a"))
    with open(first.run_dir / "data" / "uci_digits_region.splits.csv") as f:
        split_of = {r["id"]: r["split"] for r in csv.DictReader(f)}
    train = [i for i, s in split_of.items() if s == "train"]
    wanted = train[::-1][:40]  # not the recipe's order: the manifest's order decides
    manifest = tmp_path / "label_first.csv"
    manifest.write_text("id,ood_score\n" + "".join(f"{i},{1 - j / 100}\n" for j, i in enumerate(wanted)))
    result = adapt(cfg_factory("adapt", f"base={base}", *REGION, *QUICK, "do_no_harm.folds=0",
                               f"calibration.manifest={manifest}", run_dir=tmp_path / "b"))
    with open(result.run_dir / "calibration.csv") as f:
        chosen = {r["id"] for r in csv.DictReader(f)}
    assert chosen == set(wanted[:30])
    cal = result.metrics["calibration"]
    assert cal["manifest"] == str(manifest) and len(cal["manifest_sha256"]) == 64
    assert any(i["role"] == "calibration_manifest" for i in load_record(result.run_dir)["inputs"])

    leak = tmp_path / "leak.csv"
    test_id = next(i for i, s in split_of.items() if s == "test")
    leak.write_text(f"id\n{test_id}\n" + "".join(f"{i}\n" for i in wanted))
    with pytest.raises(ConfigError, match="lie in the val or test split"):
        adapt(cfg_factory("adapt", f"base={base}", *REGION, *QUICK, f"calibration.manifest={leak}",
                          run_dir=tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"calibration.size=30 is larger than calibration.manifest=.*\(20 ids"):
        short = tmp_path / "short.csv"
        short.write_text("id\n" + "".join(f"{i}\n" for i in wanted[:20]))
        adapt(cfg_factory("adapt", f"base={base}", *REGION, *QUICK, f"calibration.manifest={short}",
                          run_dir=tmp_path / "d"))
    assert not (tmp_path / "c" / "adapter.safetensors").exists()

