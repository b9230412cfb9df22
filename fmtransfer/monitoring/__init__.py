"""Watching a deployed model without labels: drift tests, a label-free accuracy estimate and per-sample OOD scores.

Arrays in, verdicts out: numpy, scipy, scikit-learn and FAISS only (no torch), so an edge device running the model
with onnxruntime can use it too. ``fmtransfer.tasks.monitor`` feeds it a model's outputs; its figures are in
``fmtransfer.plots`` (matplotlib, imported only where figures are drawn).

- ``drift``: BBSD (KS per class probability, Bonferroni), MMD on PCA-reduced embeddings (permutation p-value), a
  domain classifier (held-out AUC, Mann-Whitney p-value), label shift (chi-square on predicted classes), and the
  same over consecutive windows.
- ``calibration``: temperature scaling on labelled reference data; the CBPE-style accuracy estimate.
- ``ood``: the k-th nearest reference embedding's distance (Sun et al. 2022) and its reference quantile threshold.
- ``reference``: the reference statistics, stored as .npz + .json beside the model and keyed by its sha256.
"""

from __future__ import annotations

from fmtransfer.monitoring.calibration import estimated_accuracy, fit_temperature
from fmtransfer.monitoring.drift import (
    DriftVerdict,
    bbsd_test,
    domain_classifier_test,
    label_shift_test,
    mmd_test,
    run_tests,
)
from fmtransfer.monitoring.ood import KnnOod

__all__ = ["DriftVerdict", "KnnOod", "bbsd_test", "domain_classifier_test", "estimated_accuracy", "fit_temperature",
           "label_shift_test", "mmd_test", "run_tests"]
