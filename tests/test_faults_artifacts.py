"""Fault injection into artifacts (issue #12 items 1-2): edited headers, unfinished runs, rejected exports.

Like ``tests/test_faults.py``: one test per fault, its docstring names the fault and what the user sees (README.md,
"Reliability", has the same rows), each through a stage function (``evaluate(cfg)``, ``export(cfg)``,
``predict(cfg)``, ...) with a config composed as the CLI composes it. The shared tiny ``base`` is copied before it
is changed; the adapter and the exports are made once per module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fmtransfer.errors import ArtifactError
from fmtransfer.lineage.record import RUN_FILE
from fmtransfer.tasks.evaluate import evaluate
from fmtransfer.tasks.export import GateFailed, export
from fmtransfer.tasks.predict import predict
from tests.conftest import make_cfg
from tests.fixtures import pattern, save_image

REGION = ["data=uci_digits_region", "data.limit=300"]
GLOBAL = ["data=mnist_global", "data.limit=300"]
FAST_EXPORT = ["export.quantize=none", "export.latency.repeats=1", "export.latency.warmup=0",
               "export.latency.rounds=1", "export.latency.batch_sizes=[1]", "export.parity_samples=8"]


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    """A linear-probe adapter over the shared base, fitted on the region (a few steps)."""
    from fmtransfer.tasks.adapt import adapt

    out = tmp_path_factory.mktemp("trust") / "adapt"
    return adapt(make_cfg("adapt", [f"base={base}", *REGION, "adapter=linear_probe", "adapter.steps=4",
                                    "calibration.size=30", "logger=none"], out)).outputs["adapter"]


@pytest.fixture(scope="module")
def other_base(base, tmp_path_factory) -> Path:
    """Another base of the same architecture (the shared base's weights, perturbed), saved as a model of its own."""
    import torch

    from fmtransfer.models.classifier import load_model, save_model

    model, meta = load_model(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    folder = tmp_path_factory.mktemp("other_base")
    save_model(model, {k: v for k, v in meta.items() if k != "lineage"}, folder)
    return folder


@pytest.fixture(scope="module")
def released(base, tmp_path_factory) -> Path:
    """An export run dir of the shared base (ONNX fp32, released, with its Triton repository). Read-only."""
    out = tmp_path_factory.mktemp("released") / "run"
    export(make_cfg("export", [f"model={base}", *GLOBAL, *FAST_EXPORT], out))
    return out


@pytest.fixture(scope="module")
def rejected(base, tmp_path_factory) -> Path:
    """An export run dir of the shared base whose parity gate failed (export.gates.max_abs_diff=0)."""
    out = tmp_path_factory.mktemp("rejected") / "run"
    with pytest.raises(GateFailed):
        export(make_cfg("export", [f"model={base}", *GLOBAL, *FAST_EXPORT, "export.gates.max_abs_diff=0"], out))
    return out


@pytest.fixture
def images(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(3):
        save_image(pattern(i, 28, rng), tmp_path / "images" / f"{i}.png")
    return tmp_path / "images"


def _evaluate(tmp_path: Path, *overrides: str):
    return evaluate(make_cfg("evaluate", [*REGION, *overrides], tmp_path / "ev"))


def _predict(tmp_path: Path, model: Path, images: Path, *overrides: str):
    return predict(make_cfg("predict", [f"model={model}", f"input={images}", *overrides], tmp_path / "pr"))


def _applied(edit, obj: dict) -> dict:
    """``edit(obj)``: a new dict if it returns one, else ``obj`` changed in place."""
    result = edit(obj)
    return result if isinstance(result, dict) else obj


def _edit_adapter(src: Path, dst: Path, edit) -> Path:
    """Copy an adapter file, with ``edit(header)`` applied to its JSON header (the tensors untouched)."""
    with safe_open(str(src), framework="pt") as f:
        header = json.loads(f.metadata()["fmtransfer"])
    header = _applied(edit, header)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(src)), str(dst), metadata={"fmtransfer": json.dumps(header)})
    return dst


def _edit_json(path: Path, edit) -> None:
    data = _applied(edit, json.loads(path.read_text()))
    path.write_text(json.dumps(data, indent=2))


def _copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


# --- 1. headers are covered by a hash ------------------------------------------------------------------------------

def test_adapter_header_edited_to_name_another_base(adapter, other_base, tmp_path):
    """Fault: an adapter whose JSON header was edited to name another base (its sha256 and path), which used to
    be applied to that base without a word (accuracy 1.0 -> 0.33, exit 0). User sees: an ArtifactError naming the
    file: its header does not match the header_sha256 it was written with."""
    from fmtransfer.models.classifier import load_model

    other_sha = load_model(other_base)[1]["weights_sha256"]

    def to_other(header):
        header["base"] = {**header["base"], "sha256": other_sha, "path": str(other_base)}

    edited = _edit_adapter(adapter, tmp_path / "edited" / "adapter.safetensors", to_other)
    with pytest.raises(ArtifactError, match="does not match the header_sha256") as e:
        _evaluate(tmp_path, f"adapter_file={edited}")
    assert str(edited) in str(e.value) and "edited" in str(e.value)


def test_adapter_classes_reversed(adapter, tmp_path):
    """Fault: an adapter whose header's class list was reversed, which relabelled every prediction. User sees:
    an ArtifactError: the header does not match its header_sha256."""
    edited = _edit_adapter(adapter, tmp_path / "rev" / "adapter.safetensors",
                           lambda h: h.update(classes=h["classes"][::-1]))
    with pytest.raises(ArtifactError, match=f"adapter {edited}: its header .* does not match the header_sha256"):
        _evaluate(tmp_path, f"adapter_file={edited}")


def test_model_json_classes_reversed(base, tmp_path):
    """Fault: a model.json whose classes were reversed (the weights untouched), which relabelled every prediction.
    User sees: an ArtifactError naming model.json: its header does not match its header_sha256."""
    run = _copy_run(base, tmp_path / "base")
    _edit_json(run / "model.json", lambda m: m.update(classes=m["classes"][::-1]))
    with pytest.raises(ArtifactError, match=f"model {run / 'model.json'}: its header .* header_sha256"):
        _evaluate(tmp_path, f"model={run}")


def test_adapter_header_without_base(adapter, tmp_path):
    """Fault: an adapter whose (hashed) header has no `base`, which ended in `KeyError: 'path'`. User sees: an
    ArtifactError naming the file and the missing entry."""
    from fmtransfer.lineage.io import seal_header

    def no_base(header):
        return seal_header({k: v for k, v in header.items() if k != "base"})

    edited = _edit_adapter(adapter, tmp_path / "nobase" / "adapter.safetensors", no_base)
    with pytest.raises(ArtifactError, match=f"adapter {edited}: its header has no valid 'base'"):
        _evaluate(tmp_path, f"adapter_file={edited}")


def test_artifacts_written_before_headers_were_hashed(base, adapter, tmp_path):
    """Fault: a model.json or adapter without header_sha256 (written by an earlier version, or stripped). User
    sees: an ArtifactError naming the file, saying its header cannot be verified and how to re-create it."""
    run = _copy_run(base, tmp_path / "base")
    _edit_json(run / "model.json", lambda m: m.pop("header_sha256", None))
    with pytest.raises(ArtifactError, match=f"model {run / 'model.json'} has no header_sha256.*re-create it"):
        _evaluate(tmp_path, f"model={run}")
    old = _edit_adapter(adapter, tmp_path / "old" / "adapter.safetensors", lambda h: h.pop("header_sha256", None))
    with pytest.raises(ArtifactError, match=f"adapter {old} has no header_sha256.*fmtransfer adapt"):
        _evaluate(tmp_path, f"adapter_file={old}", f"model={base}")


def _edit_onnx_metadata(src: Path, dst: Path, edit) -> Path:
    """Copy an exported ONNX file alone (no sidecar, as in a Triton repository), its fmtransfer metadata edited."""
    import onnx

    proto = onnx.load(str(src))
    for prop in proto.metadata_props:
        if prop.key == "fmtransfer":
            prop.value = json.dumps(_applied(edit, json.loads(prop.value)))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(classes=m["classes"][::-1]), "does not match the header_sha256"),
    (lambda m: m.pop("header_sha256", None), "has no header_sha256.*re-export it"),
], ids=["classes_reversed", "never_hashed"])
def test_onnx_metadata_edited_without_sidecar(released, images, tmp_path, edit, message):
    """Fault: an exported ONNX file without its sidecar (as Triton holds it) whose embedded metadata was edited
    (classes reversed) or never hashed; with no sidecar the integrity check used to be skipped. User sees:
    predict refuses it, naming the file."""
    model = _edit_onnx_metadata(released / "model.onnx", tmp_path / "alone" / "model.onnx", edit)
    with pytest.raises(ArtifactError, match=message) as e:
        _predict(tmp_path, model, images)
    assert str(model) in str(e.value)


def test_onnx_sidecar_edited(released, images, tmp_path):
    """Fault: an export sidecar (model.onnx.json) whose classes were edited, the ONNX file untouched. User sees:
    predict refuses the model: the sidecar does not match its sidecar_sha256."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("model.onnx", "model.onnx.json"):
        shutil.copy(released / name, folder / name)
    _edit_json(folder / "model.onnx.json", lambda s: s.update(classes=s["classes"][::-1]))
    with pytest.raises(ArtifactError, match="model.onnx.json does not match the sidecar_sha256"):
        _predict(tmp_path, folder / "model.onnx", images)
    (folder / "model.onnx.json").unlink()  # the untouched file alone, as a Triton repository holds it, is served
    assert _predict(tmp_path, folder / "model.onnx", images).metrics["n"] == 3


# --- 2. unfinished and rejected models are refused ----------------------------------------------------------------

def _killed(base: Path, dst: Path, status: str = "running") -> Path:
    """What a run killed mid-epoch 1 leaves: checkpoints/last.ckpt of epoch 0, no model.json, and a record that
    still says ``running`` (SIGKILL) or ``interrupted`` (Ctrl-C)."""
    run = _copy_run(base, dst)
    (run / "model.json").unlink()
    (run / "model.safetensors").unlink()
    _edit_json(run / RUN_FILE, lambda r: r.update(status=status, ended=None))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    return run


@pytest.mark.parametrize("status", ["running", "interrupted"])
def test_model_of_an_unfinished_run(base, tmp_path, status):
    """Fault: model=<a run killed mid-epoch 1>, which silently scored its checkpoints/last.ckpt (0.536 instead of
    0.938). User sees: an ArtifactError naming the checkpoint, the run, its status and allow_unfinished=true;
    with allow_unfinished=true the checkpoint is scored, with a warning."""
    run = _killed(base, tmp_path / "killed", status)
    with pytest.raises(ArtifactError) as e:
        _evaluate(tmp_path, f"model={run}")
    message = str(e.value)
    assert f"model={run / 'checkpoints' / 'last.ckpt'} comes from run {run}" in message
    assert f"status {status!r}" in message and "allow_unfinished=true" in message
    result = _evaluate(tmp_path, f"model={run}", "allow_unfinished=true")
    assert result.metrics["overall"]["n"] > 0


@pytest.mark.e2e
def test_killed_run_on_the_command_line(tmp_path):
    """Fault: `fmtransfer evaluate model=<run dir>` of a pretraining SIGKILLed mid-epoch 1 (a real kill, not a
    simulated one). User sees: one line on stderr naming the run, status 'running' and allow_unfinished=true, exit
    status 2, no traceback and no scores."""
    import subprocess
    import sys

    from tests.conftest import ROOT, cli_env

    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-m", "fmtransfer.pretrain", "experiment=smoke", *REGION,
                           "trainer.max_epochs=3", "trainer.limit_train_batches=5", f"hydra.run.dir={killed}",
                           "+callbacks.kill._target_=tests.helpers.KillAt", "+callbacks.kill.epoch=1",
                           "+callbacks.kill.batch=3"], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9 and (killed / "checkpoints" / "last.ckpt").is_file(), proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "fmtransfer", "evaluate", f"model={killed}", *REGION,
                           f"hydra.run.dir={tmp_path / 'ev'}"], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "ev" / "metrics.json").exists()
    assert f"comes from run {killed}, whose run.json says status 'running'" in proc.stderr
    assert "allow_unfinished=true" in proc.stderr


@pytest.mark.parametrize("stage", ["export", "adapt", "curate"])
def test_unfinished_run_in_other_stages(base, tmp_path, stage):
    """Fault: the killed run given to export (which gated and released it, with a Triton repository), adapt or
    curate. User sees: the same ArtifactError before any work; export releases nothing."""
    from fmtransfer.tasks.adapt import adapt
    from fmtransfer.tasks.curate import curate

    run = _killed(base, tmp_path / "killed")
    key = "model" if stage == "export" else "base"
    overrides = {"export": [*GLOBAL, *FAST_EXPORT], "adapt": [*REGION, "calibration.size=20", "adapter.steps=2"],
                 "curate": [*GLOBAL, "curation.levels=[4,2]", "curation.target_size=0.5"]}[stage]
    stage_fn = {"export": export, "adapt": adapt, "curate": curate}[stage]
    out = tmp_path / stage
    with pytest.raises(ArtifactError, match="status 'running'.*allow_unfinished=true"):
        stage_fn(make_cfg(stage, [f"{key}={run}", *overrides], out))
    assert not (out / "model.onnx").exists() and not (out / "triton").exists()
    assert not (out / "adapter.safetensors").exists() and not (out / "curated.csv").exists()


def test_predict_refuses_a_rejected_export(rejected, images, tmp_path):
    """Fault: predict model=<rejected/model.onnx>, which was served although its metadata said gates_passed:
    false. User sees: an ArtifactError naming the file, the failed gate and force=true; force=true serves it."""
    model = rejected / "rejected" / "model.onnx"
    with pytest.raises(ArtifactError, match=r"rejected by its export's gates \(fp32_parity .*force=true") as e:
        _predict(tmp_path, model, images)
    assert str(model) in str(e.value)
    result = _predict(tmp_path, model, images, "force=true")
    assert result.metrics["n"] == 3


def test_rejected_re_export_withdraws_the_earlier_release(base, released, tmp_path):
    """Fault: a run dir re-exported (the same hydra.run.dir) and rejected this time, which left the earlier
    model.onnx and triton/ in place for predict and Triton to serve. User sees: GateFailed; the run dir holds only
    rejected/ (and the reports), no released model and no Triton repository."""
    out = _copy_run(released, tmp_path / "run")
    assert (out / "model.onnx").is_file() and (out / "triton").is_dir()
    with pytest.raises(GateFailed):
        export(make_cfg("export", [f"model={base}", *GLOBAL, *FAST_EXPORT,
                                   "export.gates.max_abs_diff=0"], out))
    assert not (out / "model.onnx").exists() and not (out / "model.onnx.json").exists()
    assert not (out / "triton").exists() and not (out / ".staging").exists()
    assert (out / "rejected" / "model.onnx").is_file() and (out / "rejected" / "reason.json").is_file()
    with pytest.raises(ArtifactError, match=r"model.onnx does not exist; that export was rejected"):
        _predict(tmp_path, out, out)


def test_accuracy_floor(base, released, tmp_path):
    """Fault: an exported model that is poor on its own (the relative gates only compare INT8 with fp32, so a
    half-trained model passed them). User sees: with export.gates.min_accuracy set above its accuracy, the export
    is rejected, the min_accuracy gate named in the error, export.md and reason.json."""
    accuracy = json.loads((released / "metrics.json").read_text())["variants"][1]["accuracy"]
    assert accuracy < 0.99
    floor = round(accuracy + 0.01, 4)
    out = tmp_path / "run"
    with pytest.raises(GateFailed, match=rf"min_accuracy {accuracy:.4g} \(limit {floor:g}\)"):
        export(make_cfg("export", [f"model={base}", *GLOBAL, *FAST_EXPORT, f"export.gates.min_accuracy={floor}"],
                        out))
    assert "| min_accuracy (ONNX fp32 accuracy" in (out / "export.md").read_text()
    reason = json.loads((out / "rejected" / "reason.json").read_text())
    assert [g["name"] for g in reason["failed"]] == ["min_accuracy"]
