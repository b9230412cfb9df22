"""Monitoring on the device (predict monitor.enabled=true): settings, the reference lookup and its refusals, the
per-image OOD scores and the drift summary, on arrays (fast) and end to end on an export (slow)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.export.device_monitor import (
    DeviceMonitor,
    DeviceMonitorSettings,
    find_reference,
    open_reference,
    require_embedding,
)
from fmtransfer.monitoring.reference import build_reference

NODE = {"enabled": True, "reference": None, "alpha": 0.05, "tests": ["bbsd", "mmd", "domain_classifier",
                                                                     "label_shift"], "permutations": 99,
        "window": None}
SETTINGS = {"pca_components": 8, "ood_k": 50, "ood_quantile": 0.95, "ood_scale_k": True, "ood_bank": "train"}


def _outputs(rng, n, moved=False, d=16, c=4):
    """Embeddings in c clusters and probabilities that follow them; ``moved``: the clusters lie along other axes
    (a new scanner: features the model never saw)."""
    centres = np.eye(c, d, k=c if moved else 0) * 4
    y = rng.integers(0, c, n)
    emb = centres[y] + rng.normal(size=(n, d))
    logits = emb[:, :c] * 2
    logits[:, 0] += 3 * moved  # and unsure answers lean to one class
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return probs / probs.sum(1, keepdims=True), emb.astype(np.float32), y


@pytest.fixture
def stored(tmp_path):
    rng = np.random.default_rng(0)
    probs, emb, y = _outputs(rng, 400)
    bank = _outputs(rng, 2000)[1]
    identity = {"kind": "onnx", "path": str(tmp_path / "model.onnx"), "sha256": "a" * 64, "embedding_dim": 16}
    stats = build_reference(identity, {"recipe": "r", "split": "val", "n": 400}, SETTINGS, probs, emb, y, bank)
    path = stats.save(tmp_path / "monitoring", "reference_r_val_aaaaaaaaaaaa")
    return path, rng


def test_settings_are_checked():
    assert DeviceMonitorSettings.from_dict(NODE).tests == ("bbsd", "mmd", "domain_classifier", "label_shift")
    for key, value, match in (("alpha", 1.5, "monitor.alpha=1.5"), ("tests", ["ks"], r"unknown test\(s\) \['ks'\]"),
                              ("permutations", 5, "monitor.permutations=5"), ("window", 4, "monitor.window=4")):
        with pytest.raises(ConfigError, match=match):
            DeviceMonitorSettings.from_dict({**NODE, key: value})
    with pytest.raises(ConfigError, match="unknown key.*monitor.windows"):
        DeviceMonitorSettings.from_dict({**NODE, "windows": 10})


def test_a_model_without_an_embedding_output_is_refused_in_one_line(tmp_path):
    with pytest.raises(ArtifactError) as e:
        require_embedding(tmp_path / "model.onnx", ["logits"])
    assert str(tmp_path / "model.onnx") in str(e.value) and "export.embedding_output=true" in str(e.value)
    assert "\n" not in str(e.value)
    require_embedding(tmp_path / "model.onnx", ["logits", "embedding"])


def test_the_reference_is_found_by_the_models_sha256(stored, tmp_path):
    path, _ = stored
    model = tmp_path / "model.onnx"
    assert find_reference(model, "a" * 64, None) == path
    with pytest.raises(ArtifactError, match=r"no monitoring reference for .*model.onnx \(sha256 bbbbbbbbbbbb"):
        find_reference(model, "b" * 64, None)  # a re-exported file: the old reference is not its own
    copy = path.with_name("reference_other_val_aaaaaaaaaaaa.json")
    copy.write_text(path.read_text())
    with pytest.raises(ArtifactError, match="2 monitoring references.*monitor.reference="):
        find_reference(model, "a" * 64, None)
    assert find_reference(model, "a" * 64, str(copy)) == copy


def test_another_models_reference_is_refused(stored, tmp_path):
    path, _ = stored
    assert open_reference(path, tmp_path / "model.onnx", "a" * 64, 16).ood is not None
    with pytest.raises(ArtifactError, match="compare a model only with its own reference"):
        open_reference(path, tmp_path / "other.onnx", "c" * 64, 16)
    with pytest.raises(ArtifactError, match="dimension 16.*'embedding' output 32: .*different backbones"):
        open_reference(path, tmp_path / "model.onnx", "a" * 64, 32)


def test_shifted_images_are_flagged_and_drift_is_detected(stored, tmp_path):
    path, rng = stored
    monitor = DeviceMonitor(open_reference(path, tmp_path / "model.onnx", "a" * 64, 16),
                            DeviceMonitorSettings.from_dict({**NODE, "window": 50}))
    same_p, same_e, _ = _outputs(rng, 200)
    moved_p, moved_e, _ = _outputs(rng, 200, moved=True)
    same, moved = monitor.ood(same_e), monitor.ood(moved_e)
    assert same.shape == (200,) and moved.mean() > same.mean()
    quiet, loud = monitor.summary(same_p, same_e, same), monitor.summary(moved_p, moved_e, moved)
    assert quiet["ood"]["share"] < 0.15 < 0.5 < loud["ood"]["share"]
    assert loud["ood"]["flagged"] == int((moved > monitor.stats.ood.threshold).sum())
    assert all(v["detected"] for v in loud["drift"].values())
    assert sum(bool(v["detected"]) for v in quiet["drift"].values()) <= 1
    assert [w["n"] for w in loud["windows"]] == [50] * 4 and all(w["ood_share"] > 0.3 for w in loud["windows"])
    assert 0 < loud["estimated_accuracy"] <= 1 and loud["seconds"]["ood"] > 0
    json.dumps(loud)  # metrics.json takes it as it is


def test_a_handful_of_images_skips_the_tests_instead_of_failing(stored, tmp_path):
    path, rng = stored
    monitor = DeviceMonitor(open_reference(path, tmp_path / "model.onnx", "a" * 64, 16),
                            DeviceMonitorSettings.from_dict(NODE))
    p, e, _ = _outputs(rng, 3)
    got = monitor.summary(p, e, monitor.ood(e))
    assert got["n"] == 3 and all(v["detected"] is None and "at least" in v["skipped"] for v in got["drift"].values())
    e[1, 2] = np.nan
    with pytest.raises(Exception, match="NaN"):
        monitor.summary(p, e, np.zeros(3))


def _recipe_images(name, split, folder, n):
    """The first ``n`` images of a recipe's split as 8-bit PNG files at their own size (as a device gets them)."""
    from omegaconf import OmegaConf
    from PIL import Image

    from fmtransfer.config import config_dir
    from fmtransfer.data.recipe import load_recipe
    from fmtransfer.data.table import build_table

    table = build_table(load_recipe(OmegaConf.load(f"{config_dir()}/data/{name}.yaml")))
    folder.mkdir(parents=True)
    for i in table.indices(split)[:n]:
        Image.fromarray((np.clip(table.images[i][:, :, 0], 0, 1) * 255).round().astype(np.uint8)).save(
            folder / f"{int(i):05d}.png")
    return folder


@pytest.fixture(scope="module")
def exported_base(base, tmp_path_factory):
    from fmtransfer.tasks.export import export
    from tests.conftest import make_cfg

    out = tmp_path_factory.mktemp("device") / "export"
    return export(make_cfg("export", [f"model={base}", "data=mnist_global", "data.limit=300",
                                      "export.latency.repeats=2", "export.latency.warmup=1",
                                      "export.calibration.size=64", "export.gates.min_int8_agreement=0.9"], out))


@pytest.mark.slow
def test_export_adds_the_embedding_output_its_gates_and_the_reference(exported_base):
    from fmtransfer.export.runtime import OnnxModel

    out, m = exported_base.run_dir, exported_base.metrics
    names = [g["name"] for g in m["gates"]]
    assert m["passed"] and "fp32_embedding_cosine" in names and "int8_embedding_cosine" in names
    for precision, file in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        model = OnnxModel.load(out / file)
        assert model.output_names == ["logits", "embedding"]
        assert model.meta["embedding"]["name"] == "embedding" and model.meta["output_names"] == model.output_names
        logits, emb = model.run_outputs(np.zeros((3, 1, 28, 28), np.float32), model.output_names)
        assert logits.shape == (3, 10) and emb.shape == (3, model.meta["embedding"]["dim"])
        ref = m["monitoring_reference"][precision]
        header = json.loads(open(ref["json"]).read())
        from fmtransfer.lineage.io import sha256_file

        assert header["model"]["sha256"] == sha256_file(out / file)  # computed with this very file
        assert header["data"]["split"] == "val" and header["ood_threshold"] > 0
    pbtxt = next((out / "triton").glob("*/config.pbtxt")).read_text()
    assert 'name: "embedding"' in pbtxt and f"dims: [ {model.meta['embedding']['dim']} ]" in pbtxt


@pytest.mark.slow
def test_predict_flags_more_of_the_region_than_of_global_test_images(exported_base, tmp_path):
    from fmtransfer.export.predict import predict_files

    region = _recipe_images("uci_digits_region", "test", tmp_path / "region", 120)
    glob = _recipe_images("mnist_global", "test", tmp_path / "global", 120)
    settings = DeviceMonitorSettings.from_dict({**NODE, "window": 40})
    model = exported_base.run_dir / "model.int8.onnx"
    got = {name: predict_files(model, folder, tmp_path / f"{name}.csv", monitor=settings)
           for name, folder in (("region", region), ("global", glob))}
    with open(tmp_path / "region.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 120 and {"ood_score", "ood_flag"} <= set(rows[0])
    flags = np.array([int(r["ood_flag"]) for r in rows])
    assert flags.sum() == got["region"]["monitor"]["ood"]["flagged"]
    # a smoke-trained tiny CNN: the robust claim is the ordering, and drift on the region by at least one test
    assert got["region"]["monitor"]["ood"]["share"] > got["global"]["monitor"]["ood"]["share"]
    assert any(v["detected"] for v in got["region"]["monitor"]["drift"].values())
    assert len(got["region"]["monitor"]["windows"]) == 3


@pytest.mark.slow
def test_device_monitoring_imports_no_torch(exported_base, tmp_path):
    from tests.conftest import ROOT, cli_env

    folder = _recipe_images("uci_digits_region", "test", tmp_path / "imgs", 30)
    code = (f"import sys, json; from fmtransfer.export.predict import predict_files; "
            f"from fmtransfer.export.device_monitor import DeviceMonitorSettings; "
            f"r = predict_files({str(exported_base.run_dir / 'model.onnx')!r}, {str(folder)!r}, "
            f"{str(tmp_path / 'p.csv')!r}, monitor=DeviceMonitorSettings.from_dict({NODE!r})); "
            f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & "
            f"{{'torch', 'torchvision', 'pytorch_lightning', 'lightning', 'timm', 'peft', 'onnx', 'omegaconf'}}); "
            f"print(json.dumps([r['monitor']['n'], heavy]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [30, []]


@pytest.mark.slow
def test_predict_refuses_a_model_without_embedding_or_another_models_reference(base, exported_base, tmp_path):
    from fmtransfer.export.predict import predict_files
    from fmtransfer.tasks.export import export
    from tests.conftest import make_cfg

    folder = _recipe_images("uci_digits_region", "test", tmp_path / "imgs", 12)
    plain = export(make_cfg("export", [f"model={base}", "data=mnist_global", "data.limit=300", "export.quantize=none",
                                       "export.embedding_output=false", "export.latency.repeats=1",
                                       "export.latency.warmup=0"], tmp_path / "plain"))
    assert plain.metrics["monitoring_reference"] == {} and not (tmp_path / "plain" / "monitoring").exists()
    settings = DeviceMonitorSettings.from_dict(NODE)
    with pytest.raises(ArtifactError, match=r"plain/model.onnx has no 'embedding' output.*"
                                            r"export.embedding_output=true"):
        predict_files(tmp_path / "plain" / "model.onnx", folder, tmp_path / "p.csv", monitor=settings)
    predict_files(tmp_path / "plain" / "model.onnx", folder, tmp_path / "p.csv")  # without monitoring: served
    fp32_ref = exported_base.metrics["monitoring_reference"]["fp32"]["json"]
    other = DeviceMonitorSettings.from_dict({**NODE, "reference": fp32_ref})
    with pytest.raises(ArtifactError, match="compare a model only with its own reference"):
        predict_files(exported_base.run_dir / "model.int8.onnx", folder, tmp_path / "q.csv", monitor=other)
