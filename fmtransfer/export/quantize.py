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


def quantize_model(src: str | Path, dst: str | Path, mode: Quantize, *, input_name: str,
                   calibration: np.ndarray | None = None, per_channel: bool = True, batch_size: int = 32,
                   method: str = "minmax") -> Path:
    """Write an INT8 version of ``src`` to ``dst``.

    Args:
        mode: DYNAMIC quantizes weights (activations at run time); STATIC writes QDQ nodes with activation
            ranges calibrated (MinMax) on ``calibration``: (N, C, H, W) float32 preprocessed inputs.
        per_channel: one scale per output channel of each weight (keeps convolutions accurate).
        method: how STATIC turns calibration activations into ranges: minmax, entropy or percentile (99.999%).
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
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a "consider pre-processing" advert on every call
    try:
        if mode is Quantize.DYNAMIC:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
        else:
            if calibration is None or len(calibration) == 0:
                raise ConfigError("static quantization needs calibration images (export.calibration.size > 0)")
            chunks = (calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size))
            if method not in CALIBRATION_METHODS:
                raise ConfigError(f"export.calibration.method={method!r}: choose from {', '.join(CALIBRATION_METHODS)}")
            calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                         "percentile": CalibrationMethod.Percentile}[method]
            quantize_static(str(src), str(dst), _Reader(input_name, chunks), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=calibrate)
    finally:
        root.setLevel(level)
    return Path(dst)
