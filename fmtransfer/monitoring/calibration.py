"""Temperature scaling (Guo et al. 2017) and the label-free accuracy estimate built on it.

The estimate is confidence-based performance estimation (CBPE, as NannyML does for tabular models): once the
model's confidences are calibrated on labelled reference data, the mean calibrated top-class probability on new,
unlabelled data estimates its accuracy there. It assumes the calibration carries over (covariate shift that keeps
p(y | x)); under a shift the model has never seen, confidences stay high where accuracy falls, so the estimate
is an upper bound in practice, not a measurement.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from fmtransfer.errors import DataError
from fmtransfer.monitoring.drift import check_finite

_EPS = 1e-12
LOG_T_BOUNDS = (-4.0, 4.0)  # temperatures from 0.018 to 55


def as_logits(probs: np.ndarray) -> np.ndarray:
    """Log-probabilities: logits up to a per-row constant, which softmax ignores (works from probabilities alone)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, None))


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits / temperature)``."""
    logp = log_softmax(logits / temperature, axis=1)
    return float(-logp[np.arange(len(targets)), targets].mean())


def fit_temperature(probs: np.ndarray, targets: np.ndarray) -> float:
    """The temperature T minimising the NLL of ``softmax(log(probs) / T)`` on labelled data (bounded search over
    log T).

    Args:
        probs: (n, C) softmax outputs. targets: (n,) int class indices.

    Raises:
        DataError: NaNs, mismatched lengths, targets outside [0, C), or fewer than 2 samples.
    """
    probs = check_finite(probs, "reference probabilities")
    targets = np.asarray(targets)
    if targets.ndim != 1 or len(targets) != len(probs):
        raise DataError(f"temperature scaling: {len(targets)} targets for {len(probs)} probability rows")
    if len(targets) < 2:
        raise DataError(f"temperature scaling needs labelled reference samples; got {len(targets)}")
    if targets.min() < 0 or targets.max() >= probs.shape[1]:
        raise DataError(f"temperature scaling: targets outside 0..{probs.shape[1] - 1} (the model's classes)")
    logits = as_logits(probs)
    best = minimize_scalar(lambda t: nll(logits, targets, float(np.exp(t))), bounds=LOG_T_BOUNDS, method="bounded",
                           options={"xatol": 1e-4})
    return float(np.exp(best.x))


def calibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / T)``: (n, C)."""
    return np.exp(log_softmax(as_logits(probs) / float(temperature), axis=1))


def estimated_accuracy(probs: np.ndarray, temperature: float) -> float:
    """Mean calibrated top-class probability: the CBPE estimate of accuracy on data without labels."""
    probs = check_finite(probs, "current probabilities")
    if not len(probs):
        raise DataError("accuracy estimate: no current samples")
    return float(calibrated(probs, temperature).max(1).mean())
