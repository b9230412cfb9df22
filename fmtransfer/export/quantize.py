"""INT8 compression with onnxruntime.quantization: dynamic (weights only) or static QDQ (weights and
activations, calibrated on real inputs), per-channel where asked."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

import numpy as np

from fmtransfer.errors import ConfigError


class Quantize(str, Enum):
    AUTO = "auto"  # the model family's choice (fmtransfer.models.families: static for CNNs, dynamic for ViTs)
    NONE = "none"
    DYNAMIC = "dynamic"
    STATIC = "static"

    @classmethod
    def parse(cls, value: str) -> Quantize:
        try:
            return cls(str(value))
        except ValueError:
            raise ConfigError(f"export.quantize={value!r}: choose from {', '.join(m.value for m in cls)}") from None


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over (N, C, H, W) float32 chunks."""

    def __init__(self, input_name: str, batches: Iterator[np.ndarray]):
        self.input_name, self.batches = input_name, batches

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}


class _QuantizerChatter(logging.Filter):
    """Drops what onnxruntime.quantization itself logs below ERROR (its "consider pre-processing" advert on every
    call, per-tensor notes). It logs through module-level ``logging.warning``, i.e. straight on the root logger,
    so the filter sits there and tells those records apart by their source file, not by logger name."""

    def __init__(self) -> None:
        super().__init__()
        import onnxruntime.quantization

        self.package_dir = str(Path(onnxruntime.quantization.__file__).resolve().parent)

    def filter(self, record: logging.LogRecord) -> bool:
        from_quantizer = str(Path(record.pathname).resolve()).startswith(self.package_dir)
        return record.levelno >= logging.ERROR or not from_quantizer


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Silences onnxruntime.quantization's own messages for the block; every other record, on any logger, passes
    (a logger-level filter on the root sees only records logged on the root itself, so it cannot drop others')."""
    root, chatter = logging.getLogger(), _QuantizerChatter()
    root.addFilter(chatter)
    try:
        yield
    finally:
        root.removeFilter(chatter)


CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def fp32_nodes(model_path: str | Path, keep: list[str] | tuple[str, ...]) -> list[str]:
    """Names of the graph nodes that ``export.keep_fp32`` keeps unquantized.

    ``first`` and ``last`` name the first and last weighted node (Conv, Gemm or MatMul with an initializer
    operand) in graph order: the stem that sees raw pixels and the classifier that writes the logits, the two
    layers most sensitive to INT8. Any other entry must be a node name of the graph.
    """
    import onnx

    if not keep:
        return []
    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    weighted = [n.name for n in graph.node if n.op_type in WEIGHTED_OPS and any(i in weights for i in n.input)]
    names = {n.name for n in graph.node}
    out: list[str] = []
    for entry in keep:
        entry = str(entry)
        if entry in ("first", "last"):
            if not weighted:
                raise ConfigError(f"export.keep_fp32: {model_path} has no Conv/Gemm/MatMul with weights for "
                                  f"{entry!r}")
            node = weighted[0] if entry == "first" else weighted[-1]
        elif entry in names:
            node = entry
        else:
            raise ConfigError(f"export.keep_fp32: {entry!r} is neither 'first', 'last' nor a node of {model_path} "
                              f"(weighted nodes: {', '.join(weighted[:3])}, ..., {weighted[-1] if weighted else ''})")
        if node not in out:
            out.append(node)
    return out


def _channel_means(session, input_name: str, x: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Per output channel (axis 1), the mean of each session output over the images of ``x`` and every spatial
    position, accumulated batch by batch (float64)."""
    sums: list[np.ndarray] = []
    counts: list[int] = []
    for i in range(0, len(x), batch_size):
        for k, a in enumerate(session.run(None, {input_name: x[i:i + batch_size]})):
            axes = tuple(j for j in range(a.ndim) if j != 1)
            part = a.astype(np.float64).sum(axis=axes)
            if k == len(sums):
                sums.append(part)
                counts.append(0)
            else:
                sums[k] += part
            counts[k] += a.size // a.shape[1]
    return [s_ / c for s_, c in zip(sums, counts, strict=True)]


def _with_outputs(model, names: list[str]) -> bytes:
    """``model`` serialized with ``names`` (intermediate tensors) as its only graph outputs."""
    import onnx

    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.output[:]
    graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.CopyFrom(graph)
    return out.SerializeToString()


def correct_bias(fp32_path: str | Path, int8_path: str | Path, calibration: np.ndarray, *, input_name: str,
                 batch_size: int = 64) -> dict[str, float]:
    """Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2) of a static QDQ model,
    rewritten in place (atomically).

    INT8 rounding and clipping shift the mean of a layer's output: with weights and activations quantized, the
    per-channel mean of a convolution's pre-activation output over real inputs is not the fp32 model's. For each
    quantized Conv/Gemm in graph order, that shift (INT8 minus fp32, averaged over the calibration images and
    positions) is subtracted from its bias (the int32 bias in units of its scale, or an fp32 bias). Layers are
    corrected one after another, so each shift is measured with the layers before it already corrected.

    Returns:
        {node name: mean |shift| over channels before its correction}, in graph order.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from fmtransfer.export.runtime import session_options
    from fmtransfer.lineage.io import atomic_path

    fp32, q = onnx.load(str(fp32_path)), onnx.load(str(int8_path))
    inits = {i.name: i for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    fp32_nodes_by_name = {n.name: n for n in fp32.graph.node}
    targets = []  # (node, the bias initializer, its scale (None: fp32 bias))
    seen = set()
    for n in q.graph.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.name not in fp32_nodes_by_name:
            continue
        weight = producer.get(n.input[1])
        if weight is None or weight.op_type != "DequantizeLinear":
            continue  # kept in fp32
        bias = producer.get(n.input[2])
        if bias is not None and bias.op_type == "DequantizeLinear" and bias.input[0] in inits:
            init, scale = inits[bias.input[0]], numpy_helper.to_array(inits[bias.input[1]]).astype(np.float64)
        elif n.input[2] in inits:
            init, scale = inits[n.input[2]], None
        else:
            continue
        if init.name not in seen:
            seen.add(init.name)
            targets.append((n, init, scale))
    if not targets:
        return {}
    options = session_options(optimize=False)
    options.log_severity_level = 3

    def session(model, names):
        return ort.InferenceSession(_with_outputs(model, names), options, providers=["CPUExecutionProvider"])

    reference = _channel_means(session(fp32, [fp32_nodes_by_name[n.name].output[0] for n, _, _ in targets]),
                               input_name, calibration, batch_size)
    shifts = {}
    for (node, init, scale), ref in zip(targets, reference, strict=True):
        shift = _channel_means(session(q, [node.output[0]]), input_name, calibration, batch_size)[0] - ref
        shifts[node.name] = float(np.abs(shift).mean())
        value = numpy_helper.to_array(init)
        if scale is None:
            new = (value - shift.reshape(value.shape)).astype(value.dtype)
        else:
            step = np.round(shift / scale).reshape(value.shape)
            info = np.iinfo(value.dtype)
            new = np.clip(value.astype(np.int64) - step.astype(np.int64), info.min, info.max).astype(value.dtype)
        init.CopyFrom(numpy_helper.from_array(new, init.name))
    with atomic_path(int8_path) as tmp:
        onnx.save(q, str(tmp))
    return shifts


def _chunk_size(n: int, batch_size: int) -> int:
    """The largest divisor of ``n`` that is at most ``batch_size``: the histogram calibrators (entropy,
    percentile) stack every batch's activations and need equal batch sizes."""
    return max(d for d in range(1, min(n, batch_size) + 1) if n % d == 0)


def quantize_model(src: str | Path, dst: str | Path, mode: Quantize, *, input_name: str,
                   calibration: np.ndarray | None = None, per_channel: bool = True, batch_size: int = 32,
                   method: str = "minmax", keep_fp32: list[str] | tuple[str, ...] = (),
                   bias_correction: bool = False) -> Path:
    """Write an INT8 version of ``src`` to ``dst``.

    Args:
        mode: DYNAMIC quantizes weights (activations at run time); STATIC writes QDQ nodes with activation
            ranges calibrated (MinMax) on ``calibration``: (N, C, H, W) float32 preprocessed inputs.
        per_channel: one scale per output channel of each weight (keeps convolutions accurate).
        method: how STATIC turns calibration activations into ranges: minmax, entropy or percentile (99.999%).
        keep_fp32: nodes left in fp32 (see :func:`fp32_nodes`): ``("first", "last")`` keeps the stem and the
            classifier, which costs little size and latency and keeps top-1 agreement with fp32 high.
        bias_correction: STATIC only: :func:`correct_bias` on the calibration images after quantizing.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode in (Quantize.NONE, Quantize.AUTO):
        raise ConfigError("quantize_model needs export.quantize=dynamic or static (resolve auto first)")
    excluded = fp32_nodes(src, keep_fp32)
    with _quiet_quantizer():
        if mode is Quantize.DYNAMIC:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                             nodes_to_exclude=excluded)
        else:
            if calibration is None or len(calibration) == 0:
                raise ConfigError("static quantization needs calibration images (export.calibration.size > 0)")
            if method not in CALIBRATION_METHODS:
                raise ConfigError(f"export.calibration.method={method!r}: choose from {', '.join(CALIBRATION_METHODS)}")
            calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                         "percentile": CalibrationMethod.Percentile}[method]
            step = _chunk_size(len(calibration), batch_size)
            chunks = (calibration[i:i + step] for i in range(0, len(calibration), step))
            quantize_static(str(src), str(dst), _Reader(input_name, chunks), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=calibrate,
                            nodes_to_exclude=excluded)
            if bias_correction:
                correct_bias(src, dst, calibration, input_name=input_name, batch_size=batch_size)
    return Path(dst)
