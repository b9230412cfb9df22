"""Monitoring's figures (matplotlib, in the style of ``fmtransfer.plots``): p-values over windows, OOD score
histograms, and detection rates against sample size or drift level. Imported only where figures are drawn, so the
statistics run without matplotlib."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmtransfer.lineage.io import atomic_path  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def windows_png(labels: Sequence[str], p_values: Mapping[str, Sequence[float | None]], alpha: float,
                path: str | Path, title: str, extra: Mapping[str, Sequence[float | None]] | None = None) -> Path:
    """p-value of each test per window (log y, alpha dashed); ``extra`` (e.g. the estimated accuracy and the OOD
    share per window) in a second panel.

    Args:
        labels: one label per window (its first order value). p_values: {test: per-window p (None: skipped)}.
    """
    panels = 2 if extra else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(6.0, 0.35 * len(labels) + 3), 3.4 * panels), squeeze=False,
                             sharex=True)
    x = np.arange(len(labels))
    ax = axes[0][0]
    for test, ps in p_values.items():
        ys = np.array([np.nan if p is None else max(p, 1e-12) for p in ps], dtype=float)
        ax.plot(x, ys, marker="o", ms=3, label=test)
    ax.axhline(alpha, color="black", ls="--", lw=1, label=f"alpha {alpha:g}")
    ax.set_yscale("log")
    ax.set_ylabel("p-value (lower: drift)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if extra:
        ax2 = axes[1][0]
        for name, values in extra.items():
            ax2.plot(x, [np.nan if v is None else v for v in values], marker="o", ms=3, label=name)
        ax2.set_ylim(-0.02, 1.02)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    axes[-1][0].set_xticks(x, [str(v) for v in labels], rotation=45 if len(labels) > 8 else 0, ha="right")
    axes[-1][0].set_xlabel("window (first order value)")
    fig.suptitle(title)
    return _save(fig, Path(path))


def ood_histogram_png(reference: np.ndarray, current: np.ndarray, threshold: float, path: str | Path,
                      title: str) -> Path:
    """OOD scores of the reference (leave-one-out) and the current data, with the threshold."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    both = np.concatenate([reference, current])
    bins = np.linspace(float(both.min()), float(both.max()) + 1e-6, 40)
    ax.hist(reference, bins=bins, alpha=0.55, density=True, label=f"reference (n={len(reference)})")
    ax.hist(current, bins=bins, alpha=0.55, density=True, label=f"current (n={len(current)})")
    ax.axvline(threshold, color="black", ls="--", lw=1.2, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("distance to the k-th nearest reference embedding")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    return _save(fig, Path(path))


def rates_png(xs: Sequence[float], rates: Mapping[str, Sequence[float]], path: str | Path, title: str, xlabel: str,
              target: float | None = None, log_x: bool = False) -> Path:
    """Detection rate per test against ``xs`` (sample size, or the share of drifted data)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for test, ys in rates.items():
        ax.plot(xs, ys, marker="o", ms=4, label=test)
    if target is not None:
        ax.axhline(target, color="black", ls=":", lw=1, label=f"target {target:g}")
    if log_x:
        ax.set_xscale("log")
        ax.set_xticks(list(xs), [str(v) for v in xs])
        ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("detection rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, Path(path))
