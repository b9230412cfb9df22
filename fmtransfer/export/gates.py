"""Export gates: pure checks over arrays. An export that fails one is not released."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fmtransfer.errors import ConfigError


@dataclass(frozen=True)
class GateSettings:
    """Thresholds (``export.gates`` in the config, which holds their defaults).

    Attributes:
        max_abs_diff: largest |fp32 ONNX - PyTorch| allowed on any output of the parity inputs.
        min_int8_agreement: share of inputs whose INT8 top-1 class equals the fp32 ONNX one.
        max_accuracy_drop: PyTorch fp32 accuracy (R^2 for regression) minus INT8, at most (0.01 = 1 point).
        min_accuracy: the released model's own accuracy (R^2 for regression) on the gate split, at least; None:
            no floor. The relative gates pass a model that was poor before export; this one does not.
    """

    max_abs_diff: float
    min_int8_agreement: float
    max_accuracy_drop: float
    min_accuracy: float | None

    def __post_init__(self) -> None:
        if not self.max_abs_diff >= 0:  # NaN too: no difference is ever below it
            raise ConfigError(f"export.gates.max_abs_diff={self.max_abs_diff}: a largest allowed difference must be "
                              f">= 0 (no export passes a negative one); expected e.g. 1e-4")
        if not 0 <= self.min_int8_agreement <= 1:
            raise ConfigError(f"export.gates.min_int8_agreement={self.min_int8_agreement}: a share of inputs; "
                              f"expected a value in [0, 1]")
        if not self.max_accuracy_drop >= 0:
            raise ConfigError(f"export.gates.max_accuracy_drop={self.max_accuracy_drop}: a drop must be >= 0 "
                              f"(0.01 = 1 point); a negative one asks INT8 to beat fp32")
        if self.min_accuracy is not None and self.min_accuracy > 1:
            raise ConfigError(f"export.gates.min_accuracy={self.min_accuracy}: accuracy and R^2 are at most 1, so "
                              f"no model could pass; expected a value <= 1, or null for no floor")

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


def gate(name: str, value: float, threshold: float, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "value": float(value), "threshold": float(threshold), "passed": bool(passed),
            "detail": detail}


def parity_gate(reference: np.ndarray, candidate: np.ndarray, settings: GateSettings) -> dict[str, Any]:
    """reference, candidate: (N, K) outputs of PyTorch and the fp32 ONNX model on the same inputs."""
    diff = float(np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).max())
    return gate("fp32_parity", diff, settings.max_abs_diff, diff <= settings.max_abs_diff,
                f"max abs(ONNX fp32 - PyTorch) over {len(reference)} real inputs")


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows whose argmax agrees: a, b (N, K)."""
    return float((a.argmax(1) == b.argmax(1)).mean()) if len(a) else 1.0


def agreement_gate(fp32: np.ndarray, int8: np.ndarray, settings: GateSettings) -> dict[str, Any]:
    share = agreement(fp32, int8)
    return gate("int8_agreement", share, settings.min_int8_agreement, share >= settings.min_int8_agreement,
                f"INT8 top-1 equals fp32 ONNX top-1 on {len(fp32)} test inputs")


def accuracy_gate(reference: float, int8: float, metric: str, settings: GateSettings) -> dict[str, Any]:
    drop = reference - int8
    return gate("int8_accuracy_drop", drop, settings.max_accuracy_drop, drop <= settings.max_accuracy_drop + 1e-12,
                f"PyTorch fp32 {metric} {reference:.4f} - INT8 {metric} {int8:.4f}")


def floor_gate(value: float, metric: str, variant: str, settings: GateSettings) -> dict[str, Any]:
    """The released ``variant``'s own ``metric`` against ``settings.min_accuracy`` (which must be set)."""
    floor = float(settings.min_accuracy)
    return gate("min_accuracy", value, floor, value >= floor - 1e-12,
                f"{variant} {metric} {value:.4f}, at least export.gates.min_accuracy")
