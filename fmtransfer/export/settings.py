"""The ``export`` group as validated settings. ``configs/export/default.yaml`` holds every default; these
classes have none, so a key missing from a config is an error that names it rather than a silent fallback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fmtransfer.errors import ConfigError
from fmtransfer.export.gates import GateSettings
from fmtransfer.export.quantize import CALIBRATION_METHODS, Quantize


@dataclass(frozen=True)
class KeepFp32:
    """``export.keep_fp32``: nodes left in fp32 per INT8 mode, as ONNX node names or ``first`` / ``last``."""

    static: list[str]
    dynamic: list[str]

    def __post_init__(self) -> None:
        for mode in ("static", "dynamic"):
            nodes = getattr(self, mode)
            if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
                raise ConfigError(f"export.keep_fp32.{mode}={nodes!r}: expected a list of node names or first/last, "
                                  f"e.g. export.keep_fp32.static=[first,last] export.keep_fp32.dynamic=[]")

    def nodes(self, mode: Quantize) -> list[str]:
        """The list for an INT8 mode (none for ``none``)."""
        return list(getattr(self, mode.value, []))


@dataclass(frozen=True)
class ExportCalibration:
    """``export.calibration``: the images static INT8 sets its activation ranges from.

    Attributes:
        method: minmax | entropy | percentile.
        bias_correction: shift each quantized layer's bias by its mean output error on the calibration images.
        size: images drawn from ``split`` (when no manifest is given).
        split: the split they come from; never the split the gates score on.
        manifest: a CSV with an ``id`` column to calibrate on instead of a random sample.
    """

    method: str
    bias_correction: bool
    size: int
    split: str
    manifest: str | None

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(f"export.calibration.method={self.method!r} is not allowed; expected one of: "
                              f"{', '.join(repr(m) for m in CALIBRATION_METHODS)}")
        if self.size < 1:
            raise ConfigError(f"export.calibration.size={self.size} must be >= 1")


@dataclass(frozen=True)
class LatencySettings:
    """``export.latency``: timed calls per variant and batch size (see ``fmtransfer.tasks.export``)."""

    batch_sizes: list[int]
    repeats: int
    warmup: int
    rounds: int

    def __post_init__(self) -> None:
        if not isinstance(self.batch_sizes, list) or not self.batch_sizes or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.batch_sizes):
            raise ConfigError(f"export.latency.batch_sizes={self.batch_sizes!r}: expected a list of positive integers")
        if self.repeats < 1 or self.rounds < 1 or self.warmup < 0:
            raise ConfigError(f"export.latency: repeats={self.repeats} and rounds={self.rounds} must be >= 1, "
                              f"warmup={self.warmup} >= 0")


@dataclass(frozen=True)
class ExportReference:
    """``export.reference``: monitoring reference statistics written beside each released ONNX file, so that
    ``predict monitor.enabled=true`` can score drift and OOD on a device with no training data.

    Attributes:
        enabled: write them (needs the ``embedding`` output, or a head-less model).
        split: the split of ``data`` whose outputs are the reference (labelled: the temperature is fitted on it).
        max_bank: at most this many train-split embeddings in the OOD bank (a seeded sample): it bounds the file at
            ``4 x d x max_bank`` bytes.
    """

    enabled: bool
    split: str
    max_bank: int

    def __post_init__(self) -> None:
        if self.max_bank < 2:
            raise ConfigError(f"export.reference.max_bank={self.max_bank} must be >= 2 (the OOD threshold comes from "
                              f"the bank's leave-one-out scores); e.g. 10000")


@dataclass(frozen=True)
class ExportSettings:
    """``export``: how a model becomes ONNX fp32 + INT8 and what it must pass to be released.

    Attributes:
        quantize: INT8 mode; ``auto`` is the model family's choice.
        per_channel: per-channel weight scales.
        keep_fp32: nodes left unquantized per mode.
        exporter: torchscript (``torch.onnx.export(dynamo=False)``) or dynamo.
        opset: ONNX opset.
        split: the split of ``data`` the gates and the accuracy table score.
        parity_samples: real inputs of that split for the fp32 parity gate and the latency inputs.
        calibration: static INT8's calibration images.
        gates: the release thresholds.
        latency: how latency is timed.
        triton: write a Triton model repository of the released model.
        triton_max_batch_size: its ``max_batch_size``.
        name: the model's name there (None: ``<recipe>_<adapter method or base>``).
        embedding_output: a model with a head gets a second ONNX output ``embedding`` (its (n, d) pre-head
            features), gated for parity like the head's output.
        reference: the monitoring reference statistics written beside the released files.
    """

    quantize: Quantize
    per_channel: bool
    keep_fp32: KeepFp32
    exporter: Literal["torchscript", "dynamo"]
    opset: int
    split: str
    parity_samples: int
    calibration: ExportCalibration
    gates: GateSettings
    latency: LatencySettings
    triton: bool
    triton_max_batch_size: int
    name: str | None
    embedding_output: bool
    reference: ExportReference

    def __post_init__(self) -> None:
        if self.calibration.split == self.split:
            raise ConfigError(f"export.calibration.split={self.calibration.split!r} is the split the gates score "
                              f"on (export.split); calibrate on train")
        if self.parity_samples < 1:
            raise ConfigError(f"export.parity_samples={self.parity_samples} must be >= 1")
        if self.triton_max_batch_size < 1:
            raise ConfigError(f"export.triton_max_batch_size={self.triton_max_batch_size} must be >= 1")
        if self.reference.split == self.split:
            raise ConfigError(f"export.reference.split={self.reference.split!r} is the split the gates score on "
                              f"(export.split); the reference is what the model is known to work on: use val")
