"""Export gates and the Triton config: pure functions."""

from __future__ import annotations

import numpy as np
import pytest

from fmtransfer.errors import ConfigError
from fmtransfer.export.gates import (
    GateSettings,
    accuracy_gate,
    agreement,
    agreement_gate,
    embedding_gate,
    floor_gate,
    parity_gate,
)
from fmtransfer.export.quantize import Quantize
from fmtransfer.export.triton import config_pbtxt, write_repository

EMB = {"min_embedding_cosine": 0.9999, "min_int8_embedding_cosine": 0.99}
S = GateSettings(max_abs_diff=1e-4, min_int8_agreement=0.9, max_accuracy_drop=0.01, min_accuracy=None, **EMB)


def test_parity_gate_uses_the_largest_difference():
    a = np.zeros((4, 3), dtype=np.float32)
    b = a.copy()
    b[2, 1] = 5e-5
    assert parity_gate(a, b, S)["passed"] and parity_gate(a, b, S)["value"] == pytest.approx(5e-5)
    b[3, 0] = -2e-4
    g = parity_gate(a, b, S)
    assert not g["passed"] and g["value"] == pytest.approx(2e-4)


def test_agreement_and_accuracy_gates():
    fp32 = np.eye(10, dtype=np.float32)
    int8 = fp32.copy()
    int8[0] = [0, 1] + [0] * 8  # one of ten flips its top-1
    assert agreement(fp32, int8) == pytest.approx(0.9)
    assert agreement_gate(fp32, int8, S)["passed"]
    int8[1] = [1] + [0] * 9
    assert not agreement_gate(fp32, int8, S)["passed"]
    assert accuracy_gate(0.95, 0.945, "accuracy", S)["passed"]
    assert accuracy_gate(0.95, 0.96, "accuracy", S)["value"] < 0  # INT8 better: a negative drop
    assert not accuracy_gate(0.95, 0.93, "accuracy", S)["passed"]


def test_embedding_gate_is_the_worst_row_cosine():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 8)).astype(np.float32)
    close = ref * 3.0  # scaled rows: the same direction, so the same normalised k-NN distances
    g = embedding_gate(ref, close, "fp32", S)
    assert g["name"] == "fp32_embedding_cosine" and g["passed"] and g["value"] == pytest.approx(1.0)
    bent = ref.copy()
    bent[7] = -bent[7]  # fp32 parity: one sample pointing the other way fails it, however good the mean
    g = embedding_gate(ref, bent, "fp32", S)
    assert not g["passed"] and g["value"] == pytest.approx(-1.0) and g["threshold"] == 0.9999
    # INT8: the mean decides (19 identical rows and one reversed: 0.9), the worst row is in the detail
    g = embedding_gate(ref, bent, "int8", S)
    assert g["name"] == "int8_embedding_cosine" and not g["passed"] and g["value"] == pytest.approx(0.9)
    assert g["threshold"] == 0.99 and "ONNX INT8" in g["detail"] and "min -1.0000" in g["detail"]
    assert embedding_gate(ref, ref + 1e-3 * rng.normal(size=ref.shape), "int8", S)["passed"]
    zeros = np.zeros((3, 8), np.float32)
    assert embedding_gate(zeros, zeros, "fp32", S)["passed"]  # all-zero features (ReLU) on both sides agree


def test_accuracy_floor_gate():
    floor = GateSettings(max_abs_diff=1e-4, min_int8_agreement=0.9, max_accuracy_drop=0.01, min_accuracy=0.9, **EMB)
    g = floor_gate(0.85, "accuracy", "ONNX INT8", floor)
    assert g["name"] == "min_accuracy" and not g["passed"] and g["threshold"] == 0.9
    assert "ONNX INT8 accuracy 0.8500" in g["detail"] and "export.gates.min_accuracy" in g["detail"]
    assert floor_gate(0.9, "accuracy", "ONNX INT8", floor)["passed"]
    with pytest.raises(ConfigError, match=r"export.gates.min_accuracy=1.5.*at most 1"):
        GateSettings(max_abs_diff=1e-4, min_int8_agreement=0.9, max_accuracy_drop=0.01, min_accuracy=1.5, **EMB)


@pytest.mark.parametrize(("key", "value", "match"), [
    ("max_abs_diff", -1.0, r"export.gates.max_abs_diff=-1.0: .* must be >= 0"),
    ("max_abs_diff", float("nan"), r"export.gates.max_abs_diff=nan"),
    ("min_int8_agreement", 1.2, r"export.gates.min_int8_agreement=1.2: .* in \[0, 1\]"),
    ("max_accuracy_drop", -0.01, r"export.gates.max_accuracy_drop=-0.01: a drop must be >= 0"),
    ("min_embedding_cosine", 1.5, r"export.gates.min_embedding_cosine=1.5: a cosine similarity lies in \[-1, 1\]"),
    ("min_int8_embedding_cosine", float("nan"), r"export.gates.min_int8_embedding_cosine=nan"),
])
def test_a_threshold_no_export_could_meet_is_refused(key, value, match):
    with pytest.raises(ConfigError, match=match):
        GateSettings(**{**S.to_dict(), key: value})


def test_quantize_mode_is_validated():
    assert Quantize.parse("static") is Quantize.STATIC
    with pytest.raises(ConfigError, match="export.quantize='int4'.*none, dynamic, static"):
        Quantize.parse("int4")


def test_triton_repository(tmp_path):
    meta = {"input_name": "input", "output_name": "logits", "num_outputs": 3, "classes": ["a", "b", "c"],
            "preprocess": {"channels": 1, "image_size": [28, 28]}}
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"graph")
    folder = write_repository(tmp_path / "repo", "region_lora", onnx_file, meta, max_batch_size=16)
    assert (folder / "1" / "model.onnx").read_bytes() == b"graph"
    assert (folder / "labels.txt").read_text().split() == ["a", "b", "c"]
    text = (folder / "config.pbtxt").read_text()
    assert text == config_pbtxt("region_lora", meta, 16)
    for line in ('name: "region_lora"', 'platform: "onnxruntime_onnx"', "max_batch_size: 16", "dims: [ 1, 28, 28 ]",
                 "dims: [ 3 ]", 'label_filename: "labels.txt"'):
        assert line in text
    assert "embedding" not in text
    both = config_pbtxt("m", {**meta, "embedding": {"name": "embedding", "dim": 512}})
    assert both.count("\n    name: \"") == 3 and 'name: "embedding"' in both and "dims: [ 512 ]" in both
    assert both.index('"logits"') < both.index('"embedding"') and both.count("label_filename") == 1
    with pytest.raises(ConfigError, match="Triton model name"):
        write_repository(tmp_path / "repo", "bad name/..", onnx_file, meta)
