"""Evaluation metrics as pure functions over arrays."""

from __future__ import annotations

import numpy as np


def confusion_matrix(preds: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """(k, k) int64 counts; row = true class, column = predicted class.

    Args:
        preds: (n,) predicted class indices.
        targets: (n,) true class indices.
    """
    idx = targets.astype(np.int64) * num_classes + preds.astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(preds: np.ndarray, targets: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro-F1 (over classes present in targets or predictions, as scikit-learn does) and the
    confusion matrix."""
    cm = confusion_matrix(preds, targets, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    n = int(cm.sum())
    return {"n": n, "accuracy": float(tp.sum() / n) if n else float("nan"),
            "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
            "confusion_matrix": cm.tolist()}


def regression_metrics(preds: np.ndarray, targets: np.ndarray) -> dict:
    """R^2, MAE and RMSE. preds, targets: (n,) float."""
    preds, targets = preds.astype(np.float64), targets.astype(np.float64)
    err = preds - targets
    ss_tot = float(((targets - targets.mean()) ** 2).sum()) if len(targets) else 0.0
    return {"n": int(len(targets)),
            "r2": 1.0 - float((err ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
            "mae": float(np.abs(err).mean()) if len(err) else float("nan"),
            "rmse": float(np.sqrt((err ** 2).mean())) if len(err) else float("nan")}
