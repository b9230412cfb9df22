"""INT8 compression with onnxruntime.quantization: dynamic (weights only) or static QDQ (weights and
activations, calibrated on real inputs), per-channel where asked."""

from __future__ import annotations

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


def _chunk_size(n: int, batch_size: int) -> int:
    """The largest divisor of ``n`` that is at most ``batch_size``: the histogram calibrators (entropy,
    percentile) stack every batch's activations and need equal batch sizes."""
    return max(d for d in range(1, min(n, batch_size) + 1) if n % d == 0)


def quantize_model(src: str | Path, dst: str | Path, mode: Quantize, *, input_name: str,
                   calibration: np.ndarray | None = None, per_channel: bool = True, batch_size: int = 32,
                   method: str = "minmax", keep_fp32: list[str] | tuple[str, ...] = ()) -> Path:
    """Write an INT8 version of ``src`` to ``dst``.

    Args:
        mode: DYNAMIC quantizes weights (activations at run time); STATIC writes QDQ nodes with activation
            ranges calibrated (MinMax) on ``calibration``: (N, C, H, W) float32 preprocessed inputs.
        per_channel: one scale per output channel of each weight (keeps convolutions accurate).
        method: how STATIC turns calibration activations into ranges: minmax, entropy or percentile (99.999%).
        keep_fp32: nodes left in fp32 (see :func:`fp32_nodes`): ``("first", "last")`` keeps the stem and the
            classifier, which costs little size and latency and keeps top-1 agreement with fp32 high.
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
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a "consider pre-processing" advert on every call
    try:
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
    finally:
        root.setLevel(level)
    return Path(dst)
