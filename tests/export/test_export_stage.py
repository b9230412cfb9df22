"""export and predict end to end on tiny models: files, metadata, gates, rejection, the torch-free predictor."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fmtransfer.adapters.artifact import read_adapter
from fmtransfer.adapters.loading import load_adapted
from fmtransfer.data.images import read_image
from fmtransfer.data.preprocess import Preprocess
from fmtransfer.errors import ArtifactError, DataError
from fmtransfer.export.predict import predict_files
from fmtransfer.export.runtime import OnnxModel
from fmtransfer.lineage import load_record, verify_record
from fmtransfer.tasks.adapt import adapt
from fmtransfer.tasks.export import GateFailed, export
from fmtransfer.tasks.pretrain import pretrain
from tests.conftest import ROOT, cli_env, make_cfg
from tests.fixtures import corrupt, save_image

REGION = ["data=uci_digits_region", "data.limit=300"]
# INT8 gates loose enough for a smoke model trained for 40 steps: its INT8 agreement sat at 0.967-1.0 with the thread
# count of the run (the default 0.97 rejected it in CI); these tests are about the export's mechanics, and the gates
# on real models are in the benchmark. A test's own gate values come after FAST (Hydra: the last one wins).
FAST = ["export.latency.repeats=2", "export.latency.warmup=1", "export.calibration.size=64",
        "export.gates.min_int8_agreement=0.9", "export.gates.max_accuracy_drop=0.05"]


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    # enough steps and labels to beat the smoke base on the calibration set: export releases only such an adapter
    return adapt(make_cfg("adapt", [f"base={base}", *REGION, "adapter.steps=40", "calibration.size=60",
                                    "logger=none"], folder / "adapt")).outputs["adapter"]


@pytest.fixture(scope="module")
def exported(adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "run"
    return export(make_cfg("export", [f"adapter_file={adapter}", *REGION, *FAST], out))


def test_export_writes_gated_onnx_with_metadata(exported, adapter):
    out = exported.run_dir
    m = exported.metrics
    assert m["passed"] and {g["name"] for g in m["gates"]} == {"fp32_parity", "int8_agreement", "int8_accuracy_drop",
                                                               "fp32_embedding_cosine", "int8_embedding_cosine"}
    assert m["gates"][0]["value"] <= 1e-4
    assert [v["variant"] for v in m["variants"]] == ["PyTorch eager fp32", "ONNX fp32", "ONNX INT8 (static)"]
    assert all(v["batch_1_ms"] > 0 and v["batch_32_ms"] > 0 and 0 <= v["accuracy"] <= 1 for v in m["variants"])
    assert exported.outputs["model"] == out / "model.int8.onnx"
    # export.keep_fp32.static=[first,last]: the ResNet stem and the classifier stay fp32, and say so
    assert len(m["fp32_nodes"]) == 2 and m["fp32_nodes"][0].startswith("/backbone/conv1") and m["fp32_nodes"][1] == "/head/Gemm"
    assert OnnxModel.load(f"{out}/model.int8.onnx").meta["fp32_nodes"] == m["fp32_nodes"]
    assert m["bias_correction"] is True and m["calibration_method"] == "percentile"
    assert 0 < m["int8_fp32_rmse"] < 1e3  # INT8 differs from fp32, finitely
    assert OnnxModel.load(f"{out}/model.int8.onnx").meta["bias_correction"] is True

    header, _ = read_adapter(adapter)
    for name in ("model.onnx", "model.int8.onnx"):
        model = OnnxModel.load(f"{out}/{name}")
        meta = model.meta
        assert meta["classes"] == header["classes"] and meta["task"] == "classification"
        assert meta["preprocess"] == header["preprocess"]
        assert meta["lineage"]["base_sha256"] == header["base"]["sha256"]
        assert meta["lineage"]["adapter_sha256"] == header["weights_sha256"]
        assert meta["lineage"]["recipe_fingerprint"] and meta["gates_passed"]
        assert meta["do_no_harm"]["beats_base"] is True and meta["do_no_harm"]["forced"] is False
        side = json.loads(open(f"{out}/{name}.json").read())
        assert side["onnx_sha256"] and side["precision"] == ("int8" if "int8" in name else "fp32")
        # the dynamic batch axis
        x = np.zeros((3, *model.session.get_inputs()[0].shape[1:]), dtype=np.float32)
        assert model.run(x).shape == (3, 10)
    triton = f"{out}/triton/uci_digits_region_lora"
    assert open(f"{triton}/1/model.onnx", "rb").read() == open(f"{out}/model.int8.onnx", "rb").read()
    assert "dims: [ 1, 28, 28 ]" in open(f"{triton}/config.pbtxt").read()
    record = load_record(out)
    assert record["status"] == "ok" and verify_record(out) == []
    assert {p["stage"] for p in record["parents"]} == {"pretrain", "adapt"}
    assert "fp32_parity" in open(f"{out}/export.md").read()


@pytest.mark.slow
@pytest.mark.parametrize("exporter,quantize", [("torchscript", "dynamic"), ("dynamo", "dynamic"),
                                               ("dynamo", "static"), ("torchscript", "none")])
def test_both_exporters_and_quantizers_on_a_plain_model(adapter, tmp_path, exporter, quantize):
    header, _ = read_adapter(adapter)
    # 30 test images of a smoke-sized base: one INT8 flip is 3 points of agreement, so the gate only guards a
    # broken quantizer here (the real gates are measured in the benchmark)
    result = export(make_cfg("export", [f"model={header['base']['path']}", "data=mnist_global", "data.limit=300",
                                        f"export.exporter={exporter}", f"export.quantize={quantize}",
                                        "export.gates.min_int8_agreement=0.9", *FAST], tmp_path / "run"))
    m = result.metrics
    assert m["passed"] and m["exporter"] == exporter and m["quantize"] == quantize
    assert (tmp_path / "run" / "model.int8.onnx").is_file() == (quantize != "none")
    assert OnnxModel.load(result.outputs["model"]).meta["lineage"]["adapter_sha256"] is None


@pytest.mark.slow
def test_vit_with_prompts_exports(vit_base, tmp_path):
    vpt = adapt(make_cfg("adapt", [f"base={vit_base}", *REGION, "adapter=vpt", "adapter.method.num_tokens=4",
                                   "adapter.steps=4", "calibration.size=30", "logger=none"], tmp_path / "vpt"))
    m = export(make_cfg("export", [f"adapter_file={vpt.outputs['adapter']}", *REGION, *FAST,
                                   "export.exporter=dynamo", "export.gates.min_int8_agreement=0.5",
                                   "export.gates.max_accuracy_drop=0.5", "force=true"], tmp_path / "run")).metrics
    # an untrained tiny ViT has near-tied logits, so INT8 flips some; the gates on real models are in the benchmark
    assert m["passed"] and m["gates"][0]["value"] <= 1e-4
    assert m["quantize"] == "dynamic"  # export.quantize=auto: the ViT family's choice


def test_failed_gate_rejects_the_export(adapter, tmp_path):
    with pytest.raises(GateFailed, match="fp32_parity"):
        export(make_cfg("export", [f"adapter_file={adapter}", *REGION, *FAST, "export.gates.max_abs_diff=0"],
                        tmp_path / "run"))
    out = tmp_path / "run"
    assert not (out / "model.onnx").exists() and not (out / "model.int8.onnx").exists()
    assert not (out / "triton").exists() and not (out / ".staging").exists()
    assert (out / "rejected" / "model.int8.onnx").is_file()
    reason = json.loads((out / "rejected" / "reason.json").read_text())
    assert [g["name"] for g in reason["failed"]] == ["fp32_parity"]
    assert load_record(out)["status"] == "failed"


@pytest.mark.slow
def test_calibration_manifest(adapter, tmp_path):
    cal = adapter.with_name("calibration.csv")
    m = export(make_cfg("export", [f"adapter_file={adapter}", *REGION, *FAST, f"export.calibration.manifest={cal}",
                                   "export.calibration.method=percentile"], tmp_path / "ok")).metrics
    assert m["passed"]
    splits = tmp_path / "ok" / "data" / "uci_digits_region.splits.csv"
    with open(splits) as f:
        test_ids = [r["id"] for r in csv.DictReader(f) if r["split"] == "test"][:5]
    leak = tmp_path / "leak.csv"
    leak.write_text("id\n" + "\n".join(test_ids) + "\n")
    with pytest.raises(DataError, match="split used by the gates"):
        export(make_cfg("export", [f"adapter_file={adapter}", *REGION, *FAST, f"export.calibration.manifest={leak}"],
                        tmp_path / "leak"))


def _digit_images(folder, n=12):
    """Real region images as files: UCI digits at their own 8x8 size (the model resizes to 28x28)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    paths = []
    for i in range(n):
        arr = (d.images[i] * (255 / 16)).astype(np.uint8)[:, :, None]
        paths.append(save_image(arr, folder / f"{i:02d}_{d.target[i]}.png"))
    rgb = np.repeat((d.images[n] * (255 / 16)).astype(np.uint8)[:, :, None], 3, axis=-1)
    paths.append(save_image(rgb, folder / f"{n:02d}_rgb.png"))  # RGB into a grey model: converted
    return paths


@pytest.mark.e2e
def test_predict_matches_pytorch_and_imports_no_torch(exported, adapter, tmp_path):
    paths = _digit_images(tmp_path / "imgs")
    out = tmp_path / "preds.csv"
    code = (f"import sys, json; from fmtransfer.export.predict import predict_files; "
            f"r = predict_files({str(exported.run_dir / 'model.onnx')!r}, {str(tmp_path / 'imgs')!r}, {str(out)!r}); "
            f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & "
            f"{{'torch', 'torchvision', 'pytorch_lightning', 'lightning', 'timm', 'peft', 'onnx', 'omegaconf'}}); "
            f"print(json.dumps([r['n'], heavy]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    n, heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert n == len(paths) and heavy == []

    host, meta, _, _ = load_adapted(adapter)
    pre = Preprocess.from_dict(meta["preprocess"])
    x = torch.stack([pre.image(read_image(p, 1)) for p in paths])  # the training stack's preprocessing
    with torch.inference_mode():
        probs = torch.softmax(host.model(x), 1).numpy()
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    got = np.array([[float(r[f"p_{c}"]) for c in meta["classes"]] for r in rows])
    assert [r["prediction"] for r in rows] == [meta["classes"][k] for k in probs.argmax(1)]
    np.testing.assert_allclose(got, probs, atol=1e-4)


def test_predict_bad_input(exported, tmp_path):
    model = exported.run_dir / "model.int8.onnx"
    imgs = tmp_path / "imgs"
    _digit_images(imgs, n=3)
    corrupt(save_image(np.zeros((8, 8, 1), np.uint8), imgs / "broken.png"))
    save_image(np.zeros((8, 8, 6), np.uint16), imgs / "six_bands.tif")  # 6 bands cannot become grey
    with pytest.warns(UserWarning, match="2 of 6 images skipped"):
        r = predict_files(model, imgs, tmp_path / "p.csv")
    assert r["n"] == 4 and r["skipped"] == 2
    with open(r["skipped_file"]) as f:
        reasons = {row["path"].split("/")[-1]: row["reason"] for row in csv.DictReader(f)}
    assert set(reasons) == {"broken.png", "six_bands.tif"} and "channel" in reasons["six_bands.tif"]

    only_bad = tmp_path / "bad"
    corrupt(save_image(np.zeros((8, 8, 1), np.uint8), only_bad / "x.png"))
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no image"):
        predict_files(model, only_bad, tmp_path / "none.csv")
    assert not (tmp_path / "none.csv").exists()

    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"this is not a protobuf")
    with pytest.raises(ArtifactError, match="not a loadable ONNX model"):
        OnnxModel.load(not_onnx)
    # a model replaced behind its sidecar's back is refused
    tampered = tmp_path / "t" / "model.onnx"
    tampered.parent.mkdir()
    tampered.write_bytes((exported.run_dir / "model.onnx").read_bytes() + b"\0")
    (tmp_path / "t" / "model.onnx.json").write_text((exported.run_dir / "model.onnx.json").read_text())
    with pytest.raises(ArtifactError, match="differs from .* recorded in"):
        OnnxModel.load(tampered)
    with pytest.raises(DataError, match="neither a folder nor a .csv"):
        predict_files(model, tmp_path / "missing", tmp_path / "p2.csv")


@pytest.mark.e2e
def test_cli_export_rejection_exits_non_zero_and_predict_reads_a_csv(adapter, exported, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fmtransfer", "export", f"adapter={adapter}", *REGION, *FAST,
                           "export.quantize=none", "export.gates.max_abs_diff=0",
                           f"hydra.run.dir={tmp_path / 'rej'}"], capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert proc.returncode == 2 and "export rejected: fp32_parity" in proc.stderr
    paths = _digit_images(tmp_path / "imgs", n=4)
    manifest = tmp_path / "in.csv"
    manifest.write_text("path\n" + "".join(f"imgs/{p.name}\n" for p in paths))
    proc = subprocess.run([sys.executable, "-m", "fmtransfer.predict", f"model={exported.run_dir}",
                           f"input={manifest}", f"output={tmp_path / 'p.csv'}", f"hydra.run.dir={tmp_path / 'pr'}"],
                          capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "p.csv") as f:
        assert len(list(csv.DictReader(f))) == len(paths)


@pytest.mark.slow
def test_regression_model_exports_and_predicts(tmp_path):
    from tests.fixtures import make_npz

    npz = make_npz(tmp_path / "yield.npz", n=80, channels=4, regression=True)
    data = ["data=npz", f"data.source.path={npz}", "data.channels=4", "data.image_size=[16,16]",
            "data.task=regression", "data.classes=null", "data.limit=null"]
    base = pretrain(make_cfg("pretrain", ["experiment=smoke", *data, "method=regression"], tmp_path / "base"))
    result = export(make_cfg("export", [f"model={base.run_dir}", *data, *FAST, "export.quantize=dynamic",
                                        "export.gates.max_accuracy_drop=10"], tmp_path / "run"))
    m = result.metrics
    assert m["passed"] and m["task"] == "regression"
    # no top-1 agreement for regression; the embedding output is gated like a classifier's
    assert {g["name"] for g in m["gates"]} == {"fp32_parity", "int8_accuracy_drop", "fp32_embedding_cosine",
                                               "int8_embedding_cosine"}
    meta = OnnxModel.load(result.outputs["model"]).meta
    assert meta["output_name"] == "prediction" and meta["classes"] is None and meta["preprocess"]["channels"] == 4
    import tifffile

    tile = np.random.default_rng(0).integers(0, 255, (16, 16, 4), dtype=np.uint8)  # a 4-band tile
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "tile.tif", np.moveaxis(tile, -1, 0), photometric="minisblack")
    r = predict_files(result.outputs["model"], tmp_path / "in", tmp_path / "p.csv")
    with open(r["output"]) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "prediction"] and np.isfinite(float(rows[0]["prediction"]))
