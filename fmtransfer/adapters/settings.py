"""The ``adapt`` stage's settings, validated. ``configs/adapt.yaml`` and the ``adapter`` group hold every default;
these classes have none, so a key missing from a config is an error that names it rather than a silent fallback.

The ``_target_`` nodes (the method, the optimizer, the loss) stay specs that Hydra builds; here they are only
carried, so that the settings say everything an adaptation run is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fmtransfer.adapters.calibration import Strategy
from fmtransfer.errors import ConfigError


@dataclass(frozen=True)
class AdapterSettings:
    """The ``adapter`` group: what trains and for how long.

    Attributes:
        method: the method's spec (``_target_: fmtransfer.adapters.LoRA`` and its options).
        optimizer: a partial ``torch.optim`` spec.
        steps: optimiser steps, whatever the calibration size.
    """

    method: dict[str, Any]
    optimizer: dict[str, Any]
    steps: int

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"adapter.steps={self.steps} must be >= 1")


@dataclass(frozen=True)
class CalibrationSettings:
    """``calibration``: the labelled region samples the adapter trains on, from the region's train split only.

    Attributes:
        size: how many (None: the whole train split, or the whole manifest).
        strategy: random, stratified (class balance) or diverse (k-means on the base's embeddings).
        seed: the draw's seed.
        manifest: a CSV with an ``id`` column (``monitor``'s label_first.csv, a curated.csv, a list of one's own):
            the first ``size`` of its ids, in file order, are the calibration set; ``strategy`` is then unused.
    """

    size: int | None
    strategy: Strategy
    seed: int
    manifest: str | None

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 1:
            raise ConfigError(f"calibration.size={self.size} must be a positive integer (or null: the whole train "
                              f"split)")


@dataclass(frozen=True)
class DoNoHarmSettings:
    """``do_no_harm``: the cross-validation that compares the adapter with its base on the calibration set.

    Attributes:
        folds: K of the stratified K-fold cross-validation (K extra fits); 0: no check (the adapter is then
            "unchecked", and export and pipeline refuse it unless force=true).
        confidence: of the interval on the mean paired difference.
        resamples: bootstrap resamples for that interval.
    """

    folds: int
    confidence: float
    resamples: int

    def __post_init__(self) -> None:
        if self.folds < 0 or self.folds == 1:
            raise ConfigError(f"do_no_harm.folds={self.folds}: expected 0 (no check) or 2 or more")
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"do_no_harm.confidence={self.confidence}: expected a level in [0.5, 1), e.g. 0.95")
        if self.resamples < 100:
            raise ConfigError(f"do_no_harm.resamples={self.resamples}: expected 100 or more (e.g. 2000)")


@dataclass(frozen=True)
class AdaptSettings:
    """Everything ``adapt`` is given besides the data recipe, the base and the Lightning objects.

    Attributes:
        adapter: the ``adapter`` group.
        calibration: the calibration set.
        loss: the loss's spec.
        scheduler: the learning-rate schedule's spec (None: a constant rate).
        resume: a checkpoint or run dir to continue from (None: a fresh run).
        resume_force: resume a checkpoint written with another setup (seed, data, base, adapter, calibration, ...)
            instead of refusing it.
        checkpoints: checkpoints written over the run.
        keep_checkpoints: keep ``checkpoints/`` once the adapter is saved.
        accelerator: the device for inference (zero-shot, diverse calibration, scoring).
        do_no_harm: the check of the adapter against its base.
    """

    adapter: AdapterSettings
    calibration: CalibrationSettings
    loss: dict[str, Any]
    scheduler: dict[str, Any] | None
    resume: str | None
    resume_force: bool
    checkpoints: int
    keep_checkpoints: bool
    accelerator: str
    do_no_harm: DoNoHarmSettings

    def __post_init__(self) -> None:
        if self.checkpoints < 1:
            raise ConfigError(f"checkpoints={self.checkpoints} must be >= 1")
