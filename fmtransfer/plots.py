"""Plots people would rather look at than read: confusion matrices, training curves, and monitoring's p-values over
windows, OOD score histograms and detection rates."""

from __future__ import annotations

import csv
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


def confusion_matrix_png(cm: np.ndarray, classes: list[str], path: str | Path, title: str) -> Path:
    """Row-normalised confusion matrix with counts in the cells. cm: (k, k), row = true class."""
    cm = np.asarray(cm)
    k = len(classes)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    size = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45 if k > 10 else 0, ha="right" if k > 10 else "center")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    return _save(fig, Path(path))


def training_curves_png(metrics_csv: str | Path, path: str | Path, title: str = "training") -> Path | None:
    """Loss and validation metrics per epoch from a Lightning CSVLogger ``metrics.csv`` (None if absent)."""
    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        return None
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        if not row.get("epoch"):
            continue
        epoch = int(float(row["epoch"]))
        for key, value in row.items():
            if value and (key.endswith("_epoch") or key.startswith("val/")) and key not in ("epoch", "step"):
                series.setdefault(key.removesuffix("_epoch"), {})[epoch] = float(value)
    if not series:
        return None
    losses = {k: v for k, v in series.items() if k.endswith("loss")}
    others = {k: v for k, v in series.items() if not k.endswith("loss")}
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(10 if others else 5, 3.6), squeeze=False)
    for ax, group, ylabel in ((axes[0][0], losses, "loss"), (axes[0][-1], others, "metric")):
        for name, points in sorted(group.items()):
            xs = sorted(points)
            ax.plot([x + 1 for x in xs], [points[x] for x in xs], marker="o", ms=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, Path(path))


def learning_curve_png(summary: dict, path: str | Path, title: str, metric: str = "accuracy",
                       reference_methods: tuple[str, ...] = ("scratch",)) -> Path:
    """Metric against calibration size (log x) per method, with a spread band, and reference lines:
    zero-shot (horizontal) and from-scratch (dashed).

    summary: ``{"curves": {method: {size: {"mean", "std"}}}, "zero_shot": float | None}``.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, points in summary["curves"].items():
        sizes = sorted(points)
        mean = np.array([points[s]["mean"] for s in sizes])
        std = np.array([points[s]["std"] for s in sizes])
        reference = method in reference_methods
        line, = ax.plot(sizes, mean, marker="o", ms=4, ls="--" if reference else "-",
                        color="grey" if reference else None, label=f"{method} (reference)" if reference else method)
        if (std > 0).any():
            ax.fill_between(sizes, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    if summary.get("zero_shot") is not None:
        ax.axhline(summary["zero_shot"], color="black", ls=":", lw=1.2, label="zero-shot (no local labels)")
    ax.set_xscale("log")
    all_sizes = sorted({s for c in summary["curves"].values() for s in c})
    ax.set_xticks(all_sizes, [str(s) for s in all_sizes])
    ax.minorticks_off()
    ax.set_xlabel("local labelled samples (calibration size)")
    ax.set_ylabel(f"{metric} on the region's test split")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, Path(path))


def cluster_sizes_png(before: np.ndarray, after: np.ndarray, path: str | Path, title: str) -> Path:
    """Finest-level cluster sizes, largest first, in the pool and in the curated subset (shares, log scale).

    before, after: (k,) point counts per cluster.
    """
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(11, 3.8))
    for counts, label in ((before, "pool"), (after, "curated")):
        share = np.sort(np.asarray(counts, dtype=float))[::-1] / max(1, np.sum(counts))
        ax.plot(np.arange(1, len(share) + 1), np.where(share > 0, share, np.nan), marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("cluster rank (largest first)")
    ax.set_ylabel("share of the samples")
    ax.legend()
    ax.grid(alpha=0.3)
    bins = np.linspace(0, max(1, np.max(before)), 30)
    hist.hist(before, bins=bins, alpha=0.6, label="pool")
    hist.hist(after, bins=bins, alpha=0.6, label="curated")
    hist.set_xlabel("samples per cluster")
    hist.set_ylabel("clusters")
    hist.legend()
    fig.suptitle(title)
    return _save(fig, Path(path))


def pca_map_png(points: np.ndarray, cluster: np.ndarray, selected: np.ndarray, path: str | Path, title: str) -> Path:
    """2-D PCA map: points (m, 2) coloured by cluster (m,), the selected ones (m,) bool ringed in black."""
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.scatter(points[:, 0], points[:, 1], c=cluster, cmap="tab20", s=4, alpha=0.35, linewidths=0)
    ax.scatter(points[selected, 0], points[selected, 1], facecolors="none", edgecolors="black", s=14,
               linewidths=0.6, label=f"selected ({int(selected.sum())} of {len(points)} shown)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, Path(path))


def collapse_signals_png(epochs: list[dict], steps: list[dict], prototypes: int, path: str | Path,
                         title: str) -> Path | None:
    """DINO's collapse signals per epoch (or, for a run stopped in its first epoch, per step), each beside the
    line that marks collapse: the loss against ln(prototypes), the teacher's entropies, the student-teacher KL,
    the std of the L2-normalised embeddings against 1/sqrt(d), and the kNN accuracy on val when there is one.

    Args:
        epochs: one record per epoch (``loss``, ``teacher_entropy``, ``teacher_mean_entropy``, ``kl``,
            ``embedding_std``, ``healthy_std``, optional ``prototypes_in_use``, ``prototypes_reachable`` and
            ``knn_val_accuracy``).
        steps: per-step records of an epoch that did not finish (drawn when ``epochs`` is empty).
    """
    records, unit = (epochs, "epoch") if epochs else (steps, "step")
    if not records:
        return None
    xs = [r["epoch"] for r in records] if epochs else list(range(1, len(records) + 1))
    ln_k = float(np.log(prototypes))
    panels = [("loss", [("loss", "loss")], ln_k, f"ln({prototypes}): uniform"),
              ("teacher entropy", [("teacher_entropy", "per image"), ("teacher_mean_entropy", "of the batch mean")],
               ln_k, f"ln({prototypes})"),
              ("KL(teacher || student)", [("kl", "KL")], None, ""),
              ("std of L2-normalised embeddings", [("embedding_std", "std")],
               records[0].get("healthy_std"), "healthy 1/sqrt(d)")]
    if any("prototypes_in_use" in r for r in records):
        panels.append(("prototypes in use (exp of the batch mean's entropy)",
                       [("prototypes_in_use", "in use"), ("prototypes_reachable", "a batch could reach")],
                       prototypes, f"all {prototypes}"))
    if any("knn_val_accuracy" in r for r in records):
        panels.append(("kNN accuracy (val)", [("knn_val_accuracy", "kNN")], None, ""))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), squeeze=False)
    for ax, (name, series, line, line_label) in zip(axes[0], panels):
        for key, label in series:
            ax.plot(xs, [r.get(key, np.nan) for r in records], marker="o", ms=3, label=label)
        if line is not None:
            ax.axhline(line, color="grey", ls="--", lw=1, label=line_label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if panels[-1][0].startswith("kNN"):
        axes[0][-1].set_ylim(0, 1)
    fig.suptitle(title, y=1.03)
    return _save(fig, Path(path))


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
