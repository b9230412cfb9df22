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
        min_embedding_cosine: the ``embedding`` output of ONNX fp32 against PyTorch's: the smallest per-sample
            cosine similarity allowed (parity: any sample off is a broken export). Cosine because monitoring
            L2-normalises embeddings before its k-NN distances (for unit vectors ``|a - b|^2 = 2 (1 - cos)``).
        min_int8_embedding_cosine: the INT8 model's ``embedding`` against PyTorch's: the MEAN per-sample cosine
            similarity allowed. INT8 rounding moves every sample a little and a few more (the worst sample of the
            shared ResNet-18 sat at 0.93 with a mean of 0.98); a broken quantizer moves all of them.
    """

    max_abs_diff: float
    min_int8_agreement: float
    max_accuracy_drop: float
    min_accuracy: float | None
    min_embedding_cosine: float
    min_int8_embedding_cosine: float

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
        for key in ("min_embedding_cosine", "min_int8_embedding_cosine"):
            if not -1 <= getattr(self, key) <= 1:
                raise ConfigError(f"export.gates.{key}={getattr(self, key)}: a cosine similarity lies in [-1, 1]; "
                                  f"expected e.g. 0.99")

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


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) cosine similarity of each row pair of a, b (N, d); two all-zero rows count as identical (1)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na < 1e-12) & (nb < 1e-12)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-24)
    return np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))


def embedding_gate(reference: np.ndarray, candidate: np.ndarray, precision: str,
                   settings: GateSettings) -> dict[str, Any]:
    """The ``embedding`` output of an ONNX variant (``precision``: fp32 or int8) against PyTorch's, on the same
    inputs: fp32, the smallest per-sample cosine similarity; INT8, the mean (see :class:`GateSettings`)."""
    cos = cosine_rows(reference, candidate)
    worst, mean = (float(cos.min()), float(cos.mean())) if len(cos) else (1.0, 1.0)
    diff = float(np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).max()) if len(cos) else 0.0
    if precision == "fp32":
        return gate("fp32_embedding_cosine", worst, settings.min_embedding_cosine,
                    worst >= settings.min_embedding_cosine,
                    f"min cosine(ONNX fp32 embedding, PyTorch) over {len(cos)} real inputs (max abs diff {diff:.3g})")
    return gate("int8_embedding_cosine", mean, settings.min_int8_embedding_cosine,
                mean >= settings.min_int8_embedding_cosine,
                f"mean cosine(ONNX INT8 embedding, PyTorch) over {len(cos)} test inputs (min {worst:.4f}, max abs "
                f"diff {diff:.3g})")
