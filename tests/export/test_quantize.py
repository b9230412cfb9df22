"""INT8 quantization on a tiny CNN: which nodes stay fp32, and calibration sets of any size."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from fmtransfer.errors import ConfigError
from fmtransfer.export.onnx_export import INPUT_NAME, export_onnx
from fmtransfer.export.quantize import Quantize, correct_bias, fp32_nodes, quantize_model
from fmtransfer.export.runtime import create_session


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 12 * 12, 5)).eval()
    path = tmp_path_factory.mktemp("q") / "model.onnx"
    export_onnx(model, torch.randn(2, 1, 16, 16), path, task="classification", opset=17, exporter="torchscript")
    return path


def _weighted(path):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]


def _quantized_inputs(path):
    """Names of the Conv/Gemm nodes whose weight comes from DequantizeLinear (an INT8 initializer)."""
    graph = onnx.load(str(path)).graph
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in dq}


def test_first_and_last_resolve_to_the_stem_and_the_classifier(cnn):
    names = [n.name for n in _weighted(cnn)]
    assert fp32_nodes(cnn, ["first", "last"]) == [names[0], names[-1]]
    assert fp32_nodes(cnn, [names[1], "first", names[1]]) == [names[1], names[0]]  # de-duplicated, in order
    assert fp32_nodes(cnn, []) == []
    with pytest.raises(ConfigError, match="'conv9'.*neither"):
        fp32_nodes(cnn, ["conv9"])


@pytest.mark.parametrize("keep", [(), ("first", "last")])
def test_static_int8_keeps_the_named_nodes_in_fp32(cnn, tmp_path, keep):
    cal = np.random.default_rng(0).normal(size=(40, 1, 16, 16)).astype(np.float32)
    out = quantize_model(cnn, tmp_path / "int8.onnx", Quantize.STATIC, input_name=INPUT_NAME, calibration=cal,
                         keep_fp32=keep)
    names = [n.name for n in _weighted(cnn)]
    quantized = _quantized_inputs(out)
    if keep:
        assert quantized == {names[1]}
    else:
        assert quantized == set(names)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_takes_a_size_that_is_not_a_multiple_of_the_batch(cnn, tmp_path, method):
    # 37 images in batches of 32 used to give onnxruntime's histogram collector ragged arrays
    cal = np.random.default_rng(1).normal(size=(37, 1, 16, 16)).astype(np.float32)
    out = quantize_model(cnn, tmp_path / "int8.onnx", Quantize.STATIC, input_name=INPUT_NAME, calibration=cal,
                         method=method)
    logits = create_session(out).run(None, {INPUT_NAME: cal[:4]})[0]
    assert logits.shape == (4, 5) and np.isfinite(logits).all()


def _int32_biases(path):
    return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
            if i.data_type == onnx.TensorProto.INT32 and i.name.endswith("bias_quantized")}


def test_bias_correction_cancels_the_int8_mean_shift_of_every_quantized_layer(cnn, tmp_path):
    cal = np.random.default_rng(2).normal(size=(48, 1, 16, 16)).astype(np.float32)
    plain = quantize_model(cnn, tmp_path / "plain.onnx", Quantize.STATIC, input_name=INPUT_NAME, calibration=cal)
    corrected = quantize_model(cnn, tmp_path / "bc.onnx", Quantize.STATIC, input_name=INPUT_NAME, calibration=cal,
                               bias_correction=True)
    before, after = _int32_biases(plain), _int32_biases(corrected)
    assert before.keys() == after.keys() and len(before) == 3  # both convs and the classifier: all quantized
    assert all(after[k].dtype == np.int32 for k in after) and any((before[k] != after[k]).any() for k in before)
    # measuring again on the corrected model: what is left of each layer's shift is bias rounding, not error
    shifts = correct_bias(cnn, plain, cal, input_name=INPUT_NAME)
    residual = correct_bias(cnn, corrected, cal, input_name=INPUT_NAME)
    assert list(shifts) == list(residual) == sorted(_quantized_inputs(plain), key=list(shifts).index)
    assert all(shifts[k] > 0 for k in shifts)
    # (a shift below the int32 bias step, like the first conv's here, can only be rounded)
    assert all(residual[k] <= shifts[k] for k in shifts), (shifts, residual)
    assert sum(residual.values()) < 0.05 * sum(shifts.values()), (shifts, residual)


def test_bias_correction_leaves_fp32_nodes_alone(cnn, tmp_path):
    cal = np.random.default_rng(3).normal(size=(32, 1, 16, 16)).astype(np.float32)
    out = quantize_model(cnn, tmp_path / "int8.onnx", Quantize.STATIC, input_name=INPUT_NAME, calibration=cal,
                         keep_fp32=("first", "last"))
    assert list(correct_bias(cnn, out, cal, input_name=INPUT_NAME)) == [_weighted(cnn)[1].name]


def test_keep_fp32_must_be_lists_per_mode(tmp_path):
    from fmtransfer.tasks.export import export_settings
    from tests.conftest import make_cfg

    assert export_settings(make_cfg("export", [], tmp_path)).quantize is Quantize.AUTO
    with pytest.raises(ConfigError, match="export.keep_fp32.static='first': expected a list of node names"):
        export_settings(make_cfg("export", ["export.keep_fp32.static=first"], tmp_path))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) export.keep_fp32.qat; allowed: dynamic, static"):
        export_settings(make_cfg("export", ["+export.keep_fp32.qat=[first]"], tmp_path))
    with pytest.raises(ConfigError, match="export.calibration.bias_correction='yes': expected true or false"):
        export_settings(make_cfg("export", ["export.calibration.bias_correction=yes"], tmp_path))


def test_quantizing_silences_only_the_quantizer(cnn, tmp_path, caplog, monkeypatch):
    import logging

    import onnxruntime.quantization as ortq

    real = ortq.quantize_dynamic

    def logs_meanwhile(*args, **kwargs):  # another part of the program logs while the quantizer runs
        logging.getLogger().warning("root message during quantization")
        logging.getLogger("fmtransfer.somewhere").info("named message during quantization")
        return real(*args, **kwargs)

    monkeypatch.setattr(ortq, "quantize_dynamic", logs_meanwhile)
    caplog.set_level(logging.INFO)
    quantize_model(cnn, tmp_path / "int8.onnx", Quantize.DYNAMIC, input_name=INPUT_NAME)
    messages = [r.getMessage() for r in caplog.records]
    assert "root message during quantization" in messages
    assert "named message during quantization" in messages
    assert not any("pre-processing" in m for m in messages), messages  # the quantizer's advert is still dropped
    assert logging.getLogger().level == logging.INFO and not logging.getLogger().filters
